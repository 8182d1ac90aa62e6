"""Mixed precision through the Trainer's flags: the encoder runs in bf16, the objective's arithmetic in float32."""

import pytest
import torch
from test_trainer import arguments, collator, tiny_encoder

from emc2_hf import ContrastiveTrainer
from emc2_hf.objectives import OBJECTIVES

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a GPU")


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=NEEDS_GPU)])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_autocast_encodes_in_half_precision_and_keeps_the_objective_in_float32(tmp_path, digits, objective, precision):
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, objective=objective, max_steps=2, use_cpu=precision == "bf16", **{precision: True}),
        train_dataset=digits["train"].select(range(32)),
        data_collator=collator(),
    )
    seen = {"embeddings": set(), "similarities": set(), "weights": set()}
    model_forward = trainer.model.forward

    def forward(*args, **kwargs):
        outputs = model_forward(*args, **kwargs)
        seen["embeddings"].add(outputs.embeddings.dtype)
        return outputs

    trainer.model.forward = forward
    negative_weights = trainer.objective.negative_weights

    def weights(problem, generator):
        seen["similarities"].add(problem.similarities.dtype)
        result = negative_weights(problem, generator)
        seen["weights"].add(result[0].dtype)
        return result

    trainer.objective.negative_weights = weights
    result = trainer.train()
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    assert seen["embeddings"] == {half}  # autocast is on
    assert seen["similarities"] == {torch.float32} and seen["weights"] == {torch.float32}
    assert all(buffer.dtype not in (torch.bfloat16, torch.float16) for buffer in trainer.objective.buffers())
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_fp16_without_a_gpu_is_refused_instead_of_silently_running_float32(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is valid")
    with pytest.raises(ValueError, match="--fp16 needs a GPU.*--bf16"):
        arguments(tmp_path, fp16=True)
