"""Train BART with bart_jax: denoising pre-training, or fine-tuning for summarization/translation,
classification and extractive question answering.

    python train.py --config configs/train/xsum.yaml --model_name_or_path <model dir> \
        --train_file train.jsonl --validation_file val.jsonl --output_dir runs/xsum

Run `python train.py --help` for every option. Rerunning the same command resumes from the
newest checkpoint in --output_dir.
"""

import sys

from bart_jax.training import main

if __name__ == "__main__":
    sys.exit(main())
