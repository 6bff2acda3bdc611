"""Two ranks resolve a JSONL file that global rank 0 tokenizes slowly - for longer than the
process group's collective timeout, which is a few seconds here.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P \\
        python tests/workers/slow_tokenize.py MODE TOKENIZER JSONL CACHE_DIR TIMEOUT_S DELAY_S

MODE: ``ok`` (rank 0 finishes), ``fail`` (rank 0 raises while tokenizing) or ``die`` (rank 0's
process vanishes while tokenizing). Each rank prints one JSON line with the prefix it got, or
an ``error:`` line and exits 2.
"""

import json
import os
import sys
import time
from datetime import timedelta


def main(mode, tokenizer, jsonl, cache_dir, timeout_s, delay_s):
    import torch.distributed as dist

    from minitron_mcore.data import datasets, preprocess, rank0_build
    from minitron_mcore.data.tokenizer import Tokenizer
    from minitron_mcore.errors import MinitronError

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # The store waits long for the other process to start; the process group's collectives
    # time out after TIMEOUT_S seconds.
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        rank == 0,
        timeout=timedelta(seconds=120),
    )
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    rank0_build._POLL_SECONDS, rank0_build._HEARTBEAT_SECONDS = 0.2, 0.5
    rank0_build._STALL_SECONDS = 4.0
    original = preprocess.iter_documents

    def slow_documents(*args, **kwargs):
        for i, doc in enumerate(original(*args, **kwargs)):
            time.sleep(delay_s)
            if i == 2 and mode == "fail":
                raise MinitronError("bad record 3 in the corpus")
            if i == 2 and mode == "die":
                os._exit(17)
            yield doc

    preprocess.iter_documents = slow_documents
    tok = Tokenizer(tokenizer)
    cfg = datasets.DataConfig(train=[jsonl], cache_dir=cache_dir, preprocess_workers=1)
    dist.barrier()  # the ranks arrive together, as after loading a model
    t0 = time.monotonic()
    try:
        prefixes, _ = datasets.resolve_blend(cfg.train, tok, cfg)
    except MinitronError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if rank == 0:
            time.sleep(3 * rank0_build._POLL_SECONDS + 1)  # as a torchrun agent lets it linger
        os._exit(2)
    print(json.dumps({"rank": rank, "prefix": prefixes[0], "seconds": time.monotonic() - t0}))
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, tokenizer, jsonl, cache_dir, timeout_s, delay_s = sys.argv[1:]
    main(mode, tokenizer, jsonl, cache_dir, float(timeout_s), float(delay_s))
