"""One rank of the many-process training test (tests/test_distributed.py launches it with torchrun).

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR

Three phases share one gloo process group (CPU): DistributedDataParallel, FSDP (fully_shard), and the
transformers Trainer; each trains a tiny patched BERT classifier for a few steps on rank-dependent data.
Every rank writes OUT_DIR/<phase>-rank<r>.pt (its final parameters); rank 0 also saves the Trainer's model
and writes OUT_DIR/trainer-reload.pt with the logits before saving and after reloading under lsg_patch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import lsg_patch
from tests.tiny_models import tiny_model

STEPS = 3
LSG = dict(max_length=128, block_size=8, sparse_block_size=8, sparsity_factor=2, sparsity_type="norm")


def patched_model() -> torch.nn.Module:
    model = tiny_model("bert", AutoModelForSequenceClassification, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return lsg_patch.to_lsg(model, **LSG).train()


def rank_batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    """Different data on every rank (so gradients must be all-reduced for the ranks to agree)."""
    generator = torch.Generator().manual_seed(100 * rank + step)
    input_ids = torch.randint(5, 99, (2, 50), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 40:] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([rank % 2, 1]))


def train(model: torch.nn.Module, rank: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        model(**rank_batch(rank, step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters by name (FSDP's DTensors are gathered)."""
    return {
        name.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


def run_ddp(rank: int, out: Path) -> None:
    model = torch.nn.parallel.DistributedDataParallel(patched_model())  # find_unused_parameters=False
    train(model, rank)
    torch.save(full_parameters(model), out / f"ddp-rank{rank}.pt")


def run_fsdp(rank: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    model = patched_model()
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    train(model, rank)
    torch.save(full_parameters(model), out / f"fsdp-rank{rank}.pt")


class RankData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = rank_batch(0, index)
        return {key: value[index % 2] for key, value in batch.items()}


def run_trainer(rank: int, out: Path) -> None:
    model = patched_model()
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, ddp_find_unused_parameters=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=RankData())
    trainer.train()
    torch.save(full_parameters(model), out / f"trainer-rank{rank}.pt")
    saved = out / "trainer-model"
    trainer.save_model(str(saved))
    dist.barrier()
    if rank == 0:
        probe = rank_batch(7, 0)
        probe.pop("labels")
        model.eval()
        with torch.no_grad():
            before = model(**probe).logits
            with lsg_patch.enabled():
                reloaded = AutoModelForSequenceClassification.from_pretrained(str(saved)).eval()
            after = reloaded(**probe).logits
        torch.save({"before": before, "after": after, "is_lsg": lsg_patch.is_lsg_model(reloaded)},
                   out / "trainer-reload.pt")


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    for phase in (run_ddp, run_fsdp, run_trainer):
        phase(rank, out)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
