"""Run logging on rank 0: progress bar (loss, tokens/s, ETA), JSONL, TensorBoard, wandb."""

from __future__ import annotations

import json
import os
import sys
import time

from minitron_mcore.errors import MinitronError, require
from minitron_mcore.utils.log import log0, rank


class RunLogger:
    """Everything a training loop reports goes through :meth:`step` and :meth:`scalars`."""

    def __init__(
        self,
        log_dir: str,
        total_steps: int,
        start_step: int,
        tokens_per_step: int,
        tensorboard: bool,
        wandb_mode: str,
        wandb_project: str,
        run_name: str,
        log_interval: int,
        config: dict,
    ):
        require(
            wandb_mode in ("disabled", "offline", "online"),
            f"train.wandb={wandb_mode!r}: use disabled, offline or online",
        )
        self.active = rank() == 0
        self.tokens_per_step, self.log_interval = tokens_per_step, max(1, log_interval)
        self.total, self.t_last, self.step_last = total_steps, time.time(), start_step
        self.tb = self.wandb = self.bar = self.jsonl = None
        if not self.active:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.jsonl = open(os.path.join(log_dir, "train_log.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
            except ImportError:
                log0("tensorboard is not installed; TensorBoard logging is off")
        if wandb_mode != "disabled":
            try:
                import wandb
            except ImportError as e:
                raise MinitronError(
                    "train.wandb is set but wandb is not installed; "
                    "pip install wandb or set train.wandb=disabled"
                ) from e
            self.wandb = wandb.init(
                project=wandb_project, name=run_name, mode=wandb_mode, dir=log_dir, config=config
            )
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=run_name,
                dynamic_ncols=True,
                unit="step",
            )

    def scalars(self, step: int, values: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):
                if self.tb:
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def step(self, step: int, values: dict, primary: str) -> dict:
        """One training step: ``values`` holds the named losses, ``lr`` and ``grad_norm``;
        ``values[primary]`` (the optimised loss) is logged as ``train/loss``."""
        now = time.time()
        dt = max(now - self.t_last, 1e-9) / max(step - self.step_last, 1)
        self.t_last, self.step_last = now, step
        loss, lr, grad_norm = values[primary], values["lr"], values["grad_norm"]
        row = {"train/loss": loss}
        others = {k: v for k, v in values.items() if k not in (primary, "lr", "grad_norm")}
        row.update({"train/" + k.replace(" ", "_"): v for k, v in others.items()})
        row.update(
            {
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_per_s": self.tokens_per_step / dt,
                "train/step_s": dt,
            }
        )
        self.scalars(step, row)
        if not self.active:
            return row
        extra = "".join(f" {k} {v:.4f}" for k, v in others.items())
        if self.bar is not None:
            self.bar.update(1)
            post = {primary.split()[0]: f"{loss:.4f}"}
            post.update({k.split()[0]: f"{v:.4f}" for k, v in others.items()})
            self.bar.set_postfix(lr=f"{lr:.2e}", tok_s=f"{row['train/tokens_per_s']:.0f}", **post)
        elif step % self.log_interval == 0 or step == self.total:
            eta = (self.total - step) * dt
            log0(
                "step %d/%d %s %.4f%s lr %.3e grad_norm %.3f %.0f tok/s eta %.0fs",
                step,
                self.total,
                primary,
                loss,
                extra,
                lr,
                grad_norm,
                row["train/tokens_per_s"],
                eta,
            )
        return row

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl is not None:
            self.jsonl.close()
