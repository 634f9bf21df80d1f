"""Runs the `rwkv` package's RWKV-7 (RWKV_x070) in its own process.

The package switches to RWKV-7 only through RWKV_V7_ON=1 set before its import,
which replaces its RWKV class for the whole process; the RWKV-4 tests import
the package too, so RWKV-7 runs here.  Usage:

    python pip_v7_runner.py JOBS.pt OUT.pt

JOBS.pt is a list of {"path": checkpoint .pth, "strategy": str, "seqs": [[ids]],
"split": int}; OUT.pt the same list with, per sequence, the logits of the
whole sequence in one call ("seq"), one token at a time ("rnn"), of the two
halves with the state carried ("split"), and the final state list ("state").
"""

import os
import sys

os.environ["RWKV_V7_ON"] = "1"
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402

from rwkv.model import RWKV  # noqa: E402


def main() -> None:
    jobs = torch.load(sys.argv[1])
    torch.set_num_threads(1)
    out = []
    for job in jobs:
        model = RWKV(model=job["path"].removesuffix(".pth"), strategy=job["strategy"])
        res = []
        for seq in job["seqs"]:
            full, state = model.forward(list(seq), None, full_output=True)
            rnn, st = [], None
            for t in seq:
                o, st = model.forward([t], st)
                rnn.append(o.float().clone())
            s = job["split"]
            a, st2 = model.forward(list(seq[:s]), None, full_output=True)
            b, _ = model.forward(list(seq[s:]), [x.clone() for x in st2], full_output=True)
            res.append({
                "seq": full.float().clone(),
                "rnn": torch.stack(rnn),
                "split": torch.cat([a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])]),
                "state": [x.float().clone() for x in state],
            })
        out.append(res)
    torch.save(out, sys.argv[2])


if __name__ == "__main__":
    main()
