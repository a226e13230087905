"""What the training loop does after each optimizer step: count a step skipped for a non-finite loss, log a
record when one is due, stop after too many non-finite steps in a row, and checkpoint on schedule.

Truthful records: every record carries `skipped_steps` (metrics.jsonl and TensorBoard alike); a skipped step
between two logged ones gets a record of its own, without a loss; losses are means over applied steps only
(the trainer forgets a skipped step's micro-batches), so a window of skipped steps logs no loss at all, never
0.0. A checkpoint due on a skipped step waits for the next step with a finite loss, so `latest` is always a
checkpoint whose last step was finite, the one the non-finite stop names. All of it is collective-safe: every
rank sees the same `applied` (the non-finite flag is all-reduced in train/step.py).
"""

from __future__ import annotations

from dtr_scale.errors import NonFiniteLossError
from dtr_scale.train.data_health import check_skipped_fraction


def log_step(trainer, applied: bool) -> dict[str, float] | None:
    """After step `trainer.step`: count it if skipped, log its record when one is due (every train.log_every,
    the first and the last step, and any skipped step), and raise NonFiniteLossError (one line naming the step
    and the last complete checkpoint) after train.max_nonfinite_steps skipped in a row. Returns the scalars of
    a full record, else None. Collective when a full record is due (Trainer.read_scalars)."""
    from dtr_scale.train.monitor import memory_stats

    t = trainer.cfg.train
    if applied:
        trainer.nonfinite_in_row = 0
    else:
        trainer.skipped_steps += 1
        trainer.nonfinite_in_row += 1
        trainer.monitor.message(
            f"step {trainer.step}: non-finite loss on some rank, optimizer step skipped "
            f"({trainer.nonfinite_in_row} in a row, {trainer.skipped_steps} in total)"
        )
    logged = None
    if trainer.step % t.log_every == 0 or trainer.step == t.max_steps or trainer.step == 1:
        scalars = {**trainer.read_scalars(), **memory_stats(trainer.device)}
        logged = trainer.monitor.step(trainer.step, scalars, t.global_batch_size)
    elif not applied:
        trainer.monitor.record(trainer.step, {"skipped_steps": float(trainer.skipped_steps)})
    if trainer.nonfinite_in_row >= t.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"step {trainer.step}: stopping after {trainer.nonfinite_in_row} non-finite losses in a row "
            f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); last complete checkpoint: "
            f"{latest_text(trainer.checkpointer)} (a lower train.lr or train.grad_clip may help)"
        )
    return logged


def checkpoint_if_due(trainer) -> None:
    """Checkpoint every train.checkpoint_every steps and at train.max_steps (after the bad-data check); one due on
    a skipped step is postponed to the next step whose loss is finite. Collective."""
    t = trainer.cfg.train
    on_schedule = trainer.step % t.checkpoint_every == 0
    trainer.checkpoint_due = trainer.checkpoint_due or on_schedule
    if not (trainer.checkpoint_due or trainer.step == t.max_steps):
        return
    if trainer.nonfinite_in_row and trainer.step < t.max_steps:
        if on_schedule:
            trainer.monitor.message(
                f"step {trainer.step}: checkpoint postponed to the next step with a finite loss"
            )
        return
    data = trainer.cfg.data
    check_skipped_fraction(trainer.stream.skipped, data.max_skipped_fraction, data.shards)
    trainer.save()
    trainer.checkpoint_due = False


def latest_text(checkpointer) -> str:
    """The checkpoint a rerun resumes from, for a message: its directory, or that there is none yet."""
    tag = checkpointer.latest_tag()
    if tag is None:
        return "none written yet (a rerun starts from step 0)"
    return f"{checkpointer.dir / tag} (a rerun resumes from it)"
