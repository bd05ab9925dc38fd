"""A tiny, randomly initialised Stable-Diffusion-shaped pipeline, built offline (no weights exist on
these machines): a small ``UNet2DConditionModel``, ``AutoencoderKL`` and ``CLIPTextModel`` from
configs, a ``CLIPTokenizer`` from a letters-only vocabulary written beside it, a DDIM scheduler.

It exercises the real generation path (prompts → tokens → text encoder → denoising loop → VAE
decode → images) at a tiny cost; its images are noise-like. For tests and for measuring the
mechanism (``exps/``), never for results.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile


def build_tiny_pipeline(folder: str, image_size: int = 32, seed: int = 0) -> str:
    """Save a tiny pipeline into ``folder`` (``save_pretrained``) and return it; images are
    ``image_size`` px (the VAE halves the side once, so the UNet works at ``image_size // 2``)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=image_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=image_size)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=64, max_position_embeddings=77, layer_norm_eps=1e-5))
    tok_dir = tempfile.mkdtemp(prefix="tiny_tokenizer_")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                              model_max_length=77)
    shutil.rmtree(tok_dir, ignore_errors=True)   # save_pretrained writes the tokenizer's own files
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
