"""Training: one loop for pretraining and both fine-tunings, in small parts.

| module | what |
| --- | --- |
| `config.py` | `TrainConfig`: every option of the loop, with its default and unit |
| `loop.py` | `Trainer`: set-up and the loop, which delegates to the parts below |
| `batches.py` | the data order (a permutation per epoch, split over ranks) and the position in it |
| `optim.py` | AdamW groups and the warmup + cosine schedule |
| `validation.py` | validation loss, a task's metrics, a text sample; autocast |
| `metrics.py` | run.json, metrics.jsonl (and the --logger sinks), loss.png, tokens/s and MFU |
| `checkpoint.py` | checkpoint.pt: when to save, atomic writes, RNG states |
| `trainer_state.py` | the Trainer's state in checkpoint.pt, and `--resume` applying it |
| `out_folder.py` | --overwrite runs staged in out_dir, moved in when done; what killed runs left |
| `stop_signals.py` | SIGINT/SIGTERM held until a step ends, where the run checkpoints and stops |
| `distributed.py` | joining torchrun's process group |
| `runner.py` | the training commands: options -> data -> model -> fit -> save, for any `Task` |
"""

from fastgpt.errors import NonFiniteLossError
from fastgpt.train.config import TrainConfig
from fastgpt.train.loop import Trainer
from fastgpt.train.validation import evaluate_loss

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "evaluate_loss"]
