"""Training: AdEMAMix + WSD (optim), Goldfish and chunked cross-entropy (loss), the shared loop (loop), FSDP2 and
friends (distributed), checkpoints (checkpointing), recipes (recipe) and pretraining (pretrain)."""
