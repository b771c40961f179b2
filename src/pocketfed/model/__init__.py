"""Model zoo and LoRA adapter state (through PEFT)."""
