"""CLIP's BPE tokenizer for SD 1.5 prompts: `CLIPTokenizer()(prompts) -> (B, 77) ids`."""

from tokenizer.clip_tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer"]
