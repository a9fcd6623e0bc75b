"""CLIP's BPE tokenizer for SD 1.5 prompts: `CLIPTokenizer()(prompts) -> (B, 77) ids`; A1111's prompt syntax."""

from tokenizer.clip_tokenizer import CLIPTokenizer
from tokenizer.prompt_syntax import chunk_prompt, parse_prompt_attention, prompt_schedules

__all__ = ["CLIPTokenizer", "chunk_prompt", "parse_prompt_attention", "prompt_schedules"]
