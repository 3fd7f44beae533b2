"""experiments.reproduction.induction_check: the copy batches and a two-step run's JSON."""
import json

import numpy as np
from absl import flags
from absl.testing import flagsaver

from experiments.reproduction import induction_check
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)


def test_copy_batch_repeats_the_ids_and_masks_the_second_copy():
  x, y, mask = induction_check.copy_batch(np.random.default_rng(0), 3, 5, bos_id=1)
  assert x.shape == y.shape == (3, 10) and mask.shape == (10,)
  assert (x[:, 0] == 1).all()
  full = np.concatenate([x, y[:, -1:]], axis=1)               # BOS, a, a
  assert np.array_equal(full[:, 1:6], full[:, 6:])
  assert np.array_equal(np.flatnonzero(mask), np.arange(6, 10))
  # each masked target is the id that followed the current input in the first copy
  on = np.flatnonzero(mask)
  assert np.array_equal(y[:, on], x[:, on - 5 + 1])

def test_two_steps_write_the_table_json(tmp_path):
  out = tmp_path / "ic.json"
  was_parsed = flags.FLAGS.is_parsed()
  with flagsaver.flagsaver():
    try:
      flags.FLAGS(["induction_check", "--archs=transformer", "--steps=2", "--copy_len=4",
                   "--batch=2", "--log_every=1", f"--out={out}"])
      induction_check.main(["induction_check"])
    finally:
      flags.FLAGS.unparse_flags()
      if was_parsed:
        flags.FLAGS.mark_as_parsed()
  got = json.loads(out.read_text())
  row, = got["results"]
  assert row["arch"] == "transformer" and row["params"] > 0
  assert [s for s, _ in row["curve"]] == [1, 2] and 0 <= row["copy_acc"] <= 1
  assert np.isfinite(row["final_loss"]) and got["setup"]["copy_len"] == 4
