"""Run under ``torchrun --nproc_per_node 2`` by test_distributed.py (gloo, CPU). Writes one JSON per rank."""

import json
import os
import sys

import torch
import torch.distributed as dist
from worker_exit import finish

from emc2_hf.objectives import OBJECTIVES, build_objective, states_to_encode
from emc2_hf.training.distributed import gather_per_view, gather_rows, gather_views


def objective_equivalence(output_dir: str) -> None:
    """N processes × b images with gathered views == 1 process × Nb images: loss, gradient and per-sample state.

    Every objective; for EMC² each process encodes the chain states its own anchors start from (as the collator
    delivers them) and the states are gathered like the views."""
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    report = {}
    data = torch.randn(20, 2, 12, generator=torch.Generator().manual_seed(99))  # 20 images × 2 fixed views
    for name in OBJECTIVES:
        torch.manual_seed(0)
        model = torch.nn.Linear(12, 6)
        reference_model = torch.nn.Linear(12, 6)
        reference_model.load_state_dict(model.state_dict())
        objective = build_objective(name, 20, 5.0, seed=1, embedding_dim=6)
        reference_objective = build_objective(name, 20, 5.0, seed=1, embedding_dim=6)
        if getattr(objective, "reencodes_cache_negatives", False):
            # The negative cache's "unaugmented image" of example i is its first fixed view; both caches start equal.
            with torch.no_grad():
                objective.write_cache(torch.arange(20), model(data[:, 0]))
                reference_objective.write_cache(torch.arange(20), reference_model(data[:, 0]))
        checks = []
        for step in range(4):
            generator = torch.Generator().manual_seed(step)
            num_images = 4 * size
            indices = torch.randperm(20, generator=generator)[:num_images]
            local = indices[rank * 4 : (rank + 1) * 4]

            def encode(model, images, objective):
                """Embeddings of the views (and the states the batch lacks) and the objective's arguments."""
                keys = images.repeat(2)
                slots = torch.arange(2).repeat_interleave(images.numel())
                inputs = data[keys, slots]
                arguments = {}
                if objective.reencodes_chain_states:
                    start_keys, start_views = objective.chain_starts(keys, slots)
                    state_keys, state_views = states_to_encode(start_keys, start_views, keys, slots)
                    inputs = torch.cat([inputs, data[state_keys, state_views]])
                    arguments = {
                        "state_keys": state_keys,
                        "state_views": state_views,
                        "start_keys": start_keys,
                        "start_views": start_views,
                    }
                return model(inputs), arguments

            def cache_negatives(model, views, images, objective, share, step=step):
                """The negative cache's state columns: its draws from the gathered anchors, each process encoding
                its ``share`` of them (every distinct draw once), gathered with autograd."""
                samples = objective.sample_negatives(
                    torch.nn.functional.normalize(views.detach(), dim=-1), images.repeat(2), step=step
                )
                keys = share(torch.unique(samples))
                return {
                    "state_embeddings": gather_rows(model(data[keys, 0]), differentiable=True),
                    "state_keys": gather_rows(keys),
                    "state_views": torch.full((gather_rows(keys).numel(),), -1),
                    "start_keys": samples[:, 0],
                    "start_views": torch.full_like(samples[:, 0], -1),
                }

            embeddings, arguments = encode(model, local, objective)
            views, gathered_indices = gather_views(embeddings[:8], local)
            if getattr(objective, "reencodes_cache_negatives", False):
                arguments = cache_negatives(model, views, gathered_indices, objective, lambda keys: keys[rank::size])
            elif arguments:
                arguments = {
                    "state_embeddings": gather_rows(embeddings[8:], differentiable=True),
                    "state_keys": gather_rows(arguments["state_keys"]),
                    "state_views": gather_rows(arguments["state_views"]),
                    "start_keys": gather_per_view(arguments["start_keys"]),
                    "start_views": gather_per_view(arguments["start_views"]),
                }
            loss = objective(views, gathered_indices, step=step, **arguments).loss
            model.zero_grad()
            loss.backward()
            for parameter in model.parameters():  # what DDP does
                dist.all_reduce(parameter.grad)
                parameter.grad /= size

            reference_embeddings, reference_arguments = encode(reference_model, indices, reference_objective)
            if getattr(reference_objective, "reencodes_cache_negatives", False):
                samples = reference_objective.sample_negatives(
                    torch.nn.functional.normalize(reference_embeddings[: 2 * num_images].detach(), dim=-1),
                    indices.repeat(2),
                    step=step,
                )
                keys = torch.unique(samples)
                reference_arguments = {
                    "state_embeddings": reference_model(data[keys, 0]),
                    "state_keys": keys,
                    "state_views": torch.full_like(keys, -1),
                    "start_keys": samples[:, 0],
                    "start_views": torch.full_like(samples[:, 0], -1),
                }
            elif reference_arguments:
                reference_arguments["state_embeddings"] = reference_embeddings[2 * num_images :]
            reference_loss = reference_objective(
                reference_embeddings[: 2 * num_images], indices, step=step, **reference_arguments
            ).loss
            reference_model.zero_grad()
            reference_loss.backward()
            checks.append(
                {
                    "loss_equal": abs(loss.item() - reference_loss.item()) < 1e-6,
                    "grad_close": all(
                        torch.allclose(p.grad, q.grad, atol=1e-6)
                        for p, q in zip(model.parameters(), reference_model.parameters(), strict=True)
                    ),
                    # Integer state bit-exact; float state up to the rounding of a matmul split across processes.
                    "state_equal": all(
                        torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, atol=1e-5)
                        for a, b in zip(
                            objective.state_dict().values(), reference_objective.state_dict().values(), strict=True
                        )
                    ),
                }
            )
            with torch.no_grad():
                for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
                    p -= 0.5 * p.grad
                    q -= 0.5 * q.grad
        report[name] = checks
    with open(os.path.join(output_dir, f"objectives-rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


def trainer_state(output_dir: str) -> None:
    """ContrastiveTrainer under torchrun: every rank ends with the same per-sample state."""
    from emc2_hf import (
        ContrastiveCollator,
        ContrastiveEncoder,
        ContrastiveEncoderConfig,
        ContrastiveTrainer,
        ContrastiveTrainingArguments,
        ProbeEvaluator,
        SimCLRAugmentation,
        load_digits_dataset,
    )

    class CountingEvaluator(ProbeEvaluator):
        calls = 0

        def __call__(self, model, device=None):
            CountingEvaluator.calls += 1
            return super().__call__(model, device)

    torch.manual_seed(0)
    model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=16))
    args = ContrastiveTrainingArguments(
        output_dir=os.path.join(output_dir, "run"),
        per_device_train_batch_size=4,
        max_steps=3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    digits = load_digits_dataset(image_size=16)
    collator = ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=16))
    trainer = ContrastiveTrainer(
        model=model,
        args=args,
        train_dataset=digits["train"].select(range(40)),
        data_collator=collator,
        probe_evaluator=CountingEvaluator(
            digits["train"].select(range(60)),
            digits["test"].select(range(30)),
            collator.eval_pixel_values,
            shots_per_class=2,
            num_draws=1,
        ),
    )
    trainer.train()
    metrics = trainer.evaluate()
    rank = dist.get_rank()
    state = trainer.objective.chains
    with open(os.path.join(output_dir, f"trainer-rank{rank}.json"), "w") as handle:
        json.dump(
            {
                "world_size": dist.get_world_size(),
                "state_index": state.state_index.tolist(),
                "state_similarity": state.state_similarity.tolist(),
                "probe_calls": CountingEvaluator.calls,
                "metrics": metrics,
            },
            handle,
        )


def batch_free_run(output_dir: str) -> None:
    """A whole ContrastiveTrainer run with an encoder free of batch statistics (GroupNorm backbone, head without
    BatchNorm), global batch 8 split over however many processes torchrun started: weights and chains are saved."""
    from safetensors.torch import save_file

    from emc2_hf import (
        ContrastiveCollator,
        ContrastiveEncoder,
        ContrastiveEncoderConfig,
        ContrastiveTrainer,
        ContrastiveTrainingArguments,
        SimCLRAugmentation,
        load_digits_dataset,
    )

    size = int(os.environ["WORLD_SIZE"])  # the process group starts with the training arguments
    torch.manual_seed(0)
    model = ContrastiveEncoder(
        ContrastiveEncoderConfig(
            backbone="test_resnet",
            backbone_kwargs={"norm_layer": "groupnorm1"},
            projection_dim=16,
            projection_batch_norm=False,
        )
    )
    args = ContrastiveTrainingArguments(
        output_dir=os.path.join(output_dir, f"run-{size}"),
        per_device_train_batch_size=8 // size,
        max_steps=4,
        optim="sgd",  # Adam would turn float rounding of near-zero gradients into ±lr steps
        learning_rate=0.05,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        ddp_backend="gloo",
        seed=0,
    )
    trainer = ContrastiveTrainer(
        model=model,
        args=args,
        train_dataset=load_digits_dataset(image_size=16)["train"].select(range(40)),
        data_collator=ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=16)),
    )
    trainer.train()
    if int(os.environ["RANK"]) == 0:
        tensors = {f"model.{name}": value.detach().clone() for name, value in model.state_dict().items()}
        tensors["state_index"] = trainer.objective.chains.state_index.clone()
        tensors["state_similarity"] = trainer.objective.chains.state_similarity.clone()
        save_file(tensors, os.path.join(output_dir, f"batch-free-{size}.safetensors"))


if __name__ == "__main__":
    modes = {"objectives": objective_equivalence, "trainer": trainer_state, "batch_free": batch_free_run}
    modes[sys.argv[1]](sys.argv[2])
    finish()
