"""
Optional live loggers for a run watched from elsewhere, beside metrics.jsonl (which stays the record):
TensorBoard event files in out_dir/tensorboard/ (torch.utils.tensorboard, needs the `tensorboard`
package) and Weights & Biases (needs `wandb`; WANDB_MODE=offline and the rest of its environment are its
own, honoured as wandb reads them). Rank 0 writes, the same records metrics.jsonl gets; neither package is
a dependency: asking for one that is not installed is a one-line error before anything starts.
"""
import dataclasses
import importlib.util
import os

KINDS = {"tensorboard": "tensorboard", "wandb": "wandb"}     # --log_to value -> the package it needs


def check(log_to: str) -> list:
    """The loggers named in --log_to ("", "tensorboard", "wandb" or both, comma-separated), each installed;
    else SystemExit with one line naming what is missing (every rank alike)."""
    names = [n.strip() for n in log_to.split(",") if n.strip()]
    for n in names:
        if n not in KINDS:
            raise SystemExit(f"error: --log_to={log_to!r}: {n!r} is not one of {', '.join(KINDS)}")
        if importlib.util.find_spec(KINDS[n]) is None:
            raise SystemExit(f"error: --log_to={n} needs the {KINDS[n]} package: pip install {KINDS[n]}")
    return names


class Loggers:
    """log(record) sends each numeric value of a metrics.jsonl record at its step; on rank != 0, or with no
    logger asked for, it does nothing. `step`: where a resumed run continues (later events are dropped)."""

    def __init__(self, cfg, rank, step=0):
        self.tb = self.wb = None
        if rank != 0:
            return
        names = check(cfg.log_to)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: what a killed run wrote after its last checkpoint is replayed, not doubled
            self.tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=step or None)
        if "wandb" in names:
            import wandb
            id_file = os.path.join(cfg.out_dir, "wandb_run_id")    # a resumed run continues its W&B run
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else wandb.util.generate_id()
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wb = wandb.init(project=cfg.wandb_project, name=os.path.basename(os.path.abspath(cfg.out_dir)),
                                 id=run_id, resume="allow", dir=cfg.out_dir, config=dataclasses.asdict(cfg))

    def log(self, record: dict):
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()
        if self.wb is not None:
            self.wb.log(values, step=record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
