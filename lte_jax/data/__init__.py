"""grain input pipeline: tokenizers, document sources, packing, synthetic retrieval data."""
from lte_jax.data.boundaries import DOCUMENTS_HELP, apply_document_masking
from lte_jax.data.errors import BAD_RECORD_POLICIES, BadRecords, DataError
from lte_jax.data.packing import PackedBatchIterDataset
from lte_jax.data.pipeline import (BAD_RECORDS_HELP, FIELD_SOURCES, FILE_SOURCES, KIND_IDS,
                                   MIXTURE_NAMES, NIAH_LOSSES, DataConfig, TrainIterator,
                                   iterator_checkpoint_args, make_document_dataset,
                                   make_train_iterator)
from lte_jax.data.retrieval import (NIAH_TASKS, MQARBatch, NIAHExample, check_mqar_args, make_niah,
                                    mqar_batch, needle_sentence, niah_prompt)
from lte_jax.data.sources import (SOURCE_KINDS, ArrayRecordSource, EmbeddedSource, JsonlSource,
                                  ParquetSource, TextFileSource, expand_glob, make_source,
                                  prose_sentences)
from lte_jax.data.tokenizers import (PIECE_CHARS, ByteTokenizer, HFTokenizer,
                                     SentencePieceTokenizer, Tokenizer, encode_document,
                                     get_tokenizer, text_pieces)
