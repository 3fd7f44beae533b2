"""experiments.eval_retrieval's flag validation: every bad --tasks / --lengths is refused
naming the flag and what it allows, before a model is loaded."""
from __future__ import annotations

import pytest
from absl.testing import flagsaver

from experiments import eval_retrieval
from lte_jax.evals import tasks as tasks_lib


@pytest.mark.parametrize("tasks, lengths, kwargs, message", [
    ([], ["1024"], {}, r"--tasks must name at least one task from \('niah_single_1', .*'mqar'"),
    (["mqar", "niah"], ["1024"], {}, r"--tasks must name tasks from .* got 'niah'"),
    (["mqar", "mqar"], ["1024"], {}, r"--tasks names 'mqar' more than once"),
    (["mqar"], [], {}, r"--lengths must name at least one context length"),
    (["mqar"], ["1k"], {}, r"--lengths must be integers \(context lengths in tokens\)"),
    (["mqar"], ["64", "64"], {}, r"--lengths names 64 more than once"),
    (["niah_single_1", "mqar"], ["1"], {},
     r"--lengths must be integers >= 130 for --tasks=niah_single_1 \(BOS \+ the prompt \+ 128 "),
    (["mqar"], ["4"], {}, r"--lengths must be integers >= 5 for --tasks=mqar"),
    (["mqar"], ["512", "64"], dict(mqar_num_pairs=16),
     r"--lengths must be integers >= 65 for --tasks=mqar .*--mqar_num_pairs.*got 64"),
    (["swde"], ["50"], {}, r"--lengths must be integers >= 51 for --tasks=swde"),
    (["mqar"], ["-3"], {}, r"--lengths must be integers >= 5 for --tasks=mqar .*got -3"),
    (["mqar"], ["64"], dict(mqar_alpha=0.0), r"--mqar_alpha must be > 0"),
])
def test_bad_flags_name_the_flag_and_what_is_allowed(tasks, lengths, kwargs, message):
  with pytest.raises(ValueError, match=message):
    eval_retrieval.check_flags(tasks, lengths, **kwargs)


def test_good_flags_come_back_parsed():
  tasks, lengths = eval_retrieval.check_flags(["niah_single_2", "mqar"], ["130", "4096"])
  assert tasks == ["niah_single_2", "mqar"] and lengths == [130, 4096]
  assert eval_retrieval.check_flags(["mqar"], ["5"]) == (["mqar"], [5])
  for task in tasks_lib.TASKS:  # every task has a smallest length
    assert eval_retrieval.min_length(task)[0] >= 5


@pytest.mark.parametrize("tasks, lengths, message", [
    ("", "1024", "eval_retrieval: --tasks must name at least one task from"),
    ("mqar", "1", "eval_retrieval: --lengths must be integers >= 5 for --tasks=mqar"),
])
def test_main_refuses_bad_flags_before_loading(tmp_path, tasks, lengths, message):
  """main as the command line runs it; the workdir does not exist, so a flag check that
  came after loading would report that instead."""
  workdir = str(tmp_path / "none")
  with flagsaver.as_parsed(workdir=workdir, checkpoint=f"{workdir}/checkpoints/0", tasks=tasks,
                           lengths=lengths, mqar_num_pairs="0", mqar_alpha="0.01"):
    with pytest.raises(SystemExit, match=message):
      eval_retrieval.main(["eval_retrieval"])
