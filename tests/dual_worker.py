"""Run under ``torchrun --nproc_per_node N`` by test_dual_encoder_training.py (gloo, CPU): a dual-encoder run with
global batch 8 split over N processes; rank 0 saves the weights and both chain tables."""

import os
import sys

from dual_fixtures import digits_tokenizer, tiny_dual_encoder
from safetensors.torch import save_file
from worker_exit import finish

from emc2_hf import ContrastiveTrainer, ContrastiveTrainingArguments, ImageTextCollator, ImageTextTransforms
from emc2_hf.data.image_text import load_digits_captions


def dual_run(objective: str, output_dir: str) -> None:
    size = int(os.environ["WORLD_SIZE"])
    tokenizer = digits_tokenizer(os.path.join(output_dir, f"tokenizer-{objective}-{size}-{os.environ['RANK']}"))
    model = tiny_dual_encoder(batch_free=True)
    args = ContrastiveTrainingArguments(
        output_dir=os.path.join(output_dir, f"run-{objective}-{size}"),
        objective=objective,
        per_device_train_batch_size=8 // size,
        max_steps=6,  # 48 pairs seen of 40: the second epoch re-encodes chain states
        optim="sgd",
        learning_rate=0.05,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        seed=0,
    )
    trainer = ContrastiveTrainer(
        model=model,
        args=args,
        train_dataset=load_digits_captions(image_size=16)["train"].select(range(40)),
        data_collator=ImageTextCollator(tokenizer, ImageTextTransforms(image_size=16), max_length=16),
    )
    trainer.train()
    if int(os.environ["RANK"]) == 0:
        tensors = {f"model.{name}": value.detach().clone() for name, value in model.state_dict().items()}
        tensors.update({f"chains.{name}": value.clone() for name, value in trainer.objective.state_dict().items()})
        save_file(tensors, os.path.join(output_dir, f"dual-{objective}-{size}.safetensors"))


if __name__ == "__main__":
    dual_run(sys.argv[1], sys.argv[2])
    finish()
