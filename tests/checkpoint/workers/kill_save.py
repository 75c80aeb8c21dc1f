"""Worker: save step 1, then start saving step 2 and wait to be killed before it is published.

Usage (one process, no torchrun): kill_save.py HF_DIR CKPT_ROOT MARKER
When step 2's files are all written (temporary directory complete, not yet renamed), the
test hook writes MARKER (holding the temporary directory's path) and sleeps; the test then
SIGKILLs the process group.
"""

import sys
import time
from pathlib import Path


def main() -> None:
    from common import build, train_step

    from megatron_rl.checkpoint import state

    hf_dir, root, marker = sys.argv[1:4]
    _, dims, model, opt = build(hf_dir)
    train_step(model, opt, dims)
    state.save_checkpoint(root, 1, model, opt, extra={"data_pos": 1}, keep_last=2, hf_dir=hf_dir)
    train_step(model, opt, dims)

    def wait_for_kill(tmp: Path) -> None:
        Path(marker).write_text(str(tmp))
        time.sleep(600)

    state._before_publish = wait_for_kill
    state.save_checkpoint(root, 2, model, opt, extra={"data_pos": 2}, keep_last=2, hf_dir=hf_dir)
    raise SystemExit("not killed")


if __name__ == "__main__":
    main()
