"""Long-document quality benchmark: when does reading the whole document with LSG beat truncation or chunks?

    python -m benchmarks.quality.run            # zero-shot table, plot and json under benchmarks/quality/results/
    python examples/finetune_long.py            # fine-tuning LSG vs the chunk baseline on the train split
"""
