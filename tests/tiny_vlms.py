"""Tiny randomly initialised vision-language models of each family the hf describer supports,
and of the CLIP-like dual encoders, built from configs and saved to a folder (nothing is
downloaded): the tests load them exactly as a researcher's checkpoint.

Every family shares one word-level tokenizer (``word_tokenizer``) with that family's special
tokens, 32-px images and one- or two-layer towers of 16–32 features; a chat template is given
where the family's processor has one, none where the family takes a plain prompt.
"""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = ("you study the first stages of visual processing picture is a grid small patches "
         "black white red stripes diagonal dogs colour texture one phrase question answer "
         "describe what").split()
PX = 32  # image side every tiny processor resizes to

# A chat template like the families' own, in their role markers: the image where the message
# puts it, then the text; the family's processor expands the image token.
CHAT = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}IMAGE {% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def word_tokenizer(special, named=None, extra=(), close=False, **roles):
    """A word-level fast tokenizer over WORDS, after ``special`` tokens (the first four being
    pad, unk, bos, eos); ``named`` maps attribute names (image_token, boi_token …) to tokens
    the family's processor looks up on the tokenizer; ``extra`` are more ordinary tokens;
    ``close`` ends every text with </s> (where a text encoder reads its vector, as CLIP's)."""
    vocab = {w: i for i, w in enumerate(list(dict.fromkeys(
        ["<pad>", "<unk>", "<s>", "</s>", "USER:", "ASSISTANT:", *special, *WORDS, *extra])))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    if close:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                           special_tokens=[("</s>", 3)])
    settings = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    settings.update(roles)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=named or {},
                                   **settings)
    fast.add_special_tokens({"additional_special_tokens": ["USER:", "ASSISTANT:", *special]})
    return fast


def chat(image_token):
    """CHAT with the family's image placeholder."""
    return CHAT.replace("IMAGE", image_token)


def llama(vocab, **kw):
    """A two-layer Llama text config of ``vocab`` tokens (pad 0, bos 2, eos 3)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3,
                       max_position_embeddings=512, **kw)


def save(model, processor, folder):
    """Write model and processor to ``folder``. Special tokens (padding, end of text, image
    placeholders) are never generated, so that even random weights answer in words: an empty
    answer then means the decoding lost them."""
    tok = getattr(processor, "tokenizer", processor)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    model.generation_config.suppress_tokens = sorted(special | set(tok.all_special_ids))
    model.generation_config.forced_eos_token_id = None  # (BART's) would clash with the above
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def llava(folder):
    """LLaVA-1.5: CLIP vision tower, Llama text model, chat template with <image>."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tok = word_tokenizer(["<image>"], {"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": PX},
                                           crop_size={"height": PX, "width": PX}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat("<image>"))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=PX, patch_size=8,
                                       projection_dim=16),
        text_config=llama(len(tok)), image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    return save(LlavaForConditionalGeneration(config), processor, folder)


def smolvlm(folder, family="smolvlm"):
    """SmolVLM (and Idefics3, its parent: ``family="idefics3"``): SigLIP-like tower, pixel
    shuffle, <fake_token_around_image><global-img><image>… per image, no tiling."""
    import transformers as T
    prefix = {"smolvlm": "SmolVLM", "idefics3": "Idefics3"}[family]
    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    tok = word_tokenizer(list(named.values()), named)
    images = getattr(T, f"{prefix}ImageProcessor")(
        do_image_splitting=False, size={"longest_edge": PX}, max_image_size={"longest_edge": PX})
    parts = {"image_processor": images, "tokenizer": tok, "image_seq_len": 4,
             "chat_template": chat("<image>")}
    if family == "smolvlm":
        parts["video_processor"] = T.SmolVLMVideoProcessor(
            size={"longest_edge": PX}, max_image_size={"longest_edge": PX})
    processor = getattr(T, f"{prefix}Processor")(**parts)
    vision = getattr(T, f"{prefix}VisionConfig")(hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 image_size=PX, patch_size=8)
    config = getattr(T, f"{prefix}Config")(
        vision_config=vision.to_dict(), text_config=llama(len(tok)).to_dict(), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=0)
    torch.manual_seed(0)
    return save(getattr(T, f"{prefix}ForConditionalGeneration")(config), processor, folder)


def gemma3(folder):
    """Gemma 3: SigLIP tower pooled to 4 soft tokens between <start_of_image> and <end_of_image>."""
    import transformers as T
    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
             "eoi_token": "<end_of_image>"}
    tok = word_tokenizer(list(named.values()), named)
    processor = T.Gemma3Processor(
        image_processor=T.Gemma3ImageProcessor(size={"height": PX, "width": PX}),
        tokenizer=tok, image_seq_length=4, chat_template=chat("<start_of_image>"))
    ids = tok.convert_tokens_to_ids
    config = T.Gemma3Config(
        vision_config=T.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=PX, patch_size=8).to_dict(),
        text_config=T.Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, sliding_window=64,
                                       pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                       query_pre_attn_scalar=8,
                                       max_position_embeddings=512).to_dict(),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))
    torch.manual_seed(0)
    return save(T.Gemma3ForConditionalGeneration(config), processor, folder)


def mllama(folder):
    """Llama 3.2 Vision (mllama): one 32-px tile per image, read through cross-attention; one
    <|image|> token per image in the prompt."""
    import transformers as T
    tok = word_tokenizer(["<|image|>", "<|python_tag|>"], {"image_token": "<|image|>"})
    processor = T.MllamaProcessor(
        image_processor=T.MllamaImageProcessor(size={"height": PX, "width": PX},
                                               max_image_tiles=1),
        tokenizer=tok, chat_template=chat("<|image|>"))
    vision = T.MllamaVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_global_layers=1, attention_heads=2, image_size=PX,
                                  patch_size=8, max_num_tiles=1, vision_output_dim=32,
                                  intermediate_layers_indices=[0],
                                  supported_aspect_ratios=[[1, 1]])
    text = T.MllamaTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                              cross_attention_layers=[1], pad_token_id=0, bos_token_id=2,
                              eos_token_id=3, max_position_embeddings=512)
    config = T.MllamaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                            image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    torch.manual_seed(0)
    return save(T.MllamaForConditionalGeneration(config), processor, folder)


def paligemma(folder):
    """PaliGemma: SigLIP tower, Gemma text model; no chat template — a task prefix, with the
    processor putting 16 <image> tokens and <bos> in front."""
    import transformers as T
    tok = word_tokenizer(["<image>"], {"image_token": "<image>"}, extra=("answer", "en"))
    images = T.SiglipImageProcessor(size={"height": PX, "width": PX})
    images.image_seq_length = 16  # (32 px / 8 px patches)²
    processor = T.PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    config = T.PaliGemmaConfig(
        vision_config=T.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=PX, patch_size=8,
                                           projection_dim=32).to_dict(),
        text_config=T.GemmaConfig(vocab_size=len(processor.tokenizer), hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                  pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                  max_position_embeddings=512).to_dict(),
        projection_dim=32, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    return save(T.PaliGemmaForConditionalGeneration(config), processor, folder)


def _qformer(T):
    """The smallest Q-Former BLIP-2 and InstructBLIP share: one layer, 16 features."""
    return dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                encoder_hidden_size=16, vocab_size=len(WORDS) + 8, pad_token_id=0)


def _blip_vision(T, cls):
    """The smallest BLIP vision tower: one layer, 32-px images in 8-px patches."""
    return cls(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=PX, patch_size=8).to_dict()


def _text(T, kind, vocab):
    """A two-layer language model config for BLIP: OPT (decoder-only) or T5 (encoder-decoder)."""
    if kind == "opt":
        return T.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                           num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=0,
                           bos_token_id=2, eos_token_id=3,
                           max_position_embeddings=512).to_dict()
    return T.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                      num_decoder_layers=1, num_heads=4, pad_token_id=0, eos_token_id=3,
                      decoder_start_token_id=0).to_dict()


def blip2(folder, text="opt"):
    """BLIP-2: Q-Former with 4 queries; OPT (decoder-only) or T5 (``text="t5"``,
    encoder-decoder) language model; no chat template — "Question: … Answer:"."""
    import transformers as T
    tok = word_tokenizer([], {})
    processor = T.Blip2Processor(image_processor=T.BlipImageProcessor(  # adds <image>
        size={"height": PX, "width": PX}), tokenizer=tok, num_query_tokens=4)
    config = T.Blip2Config(vision_config=_blip_vision(T, T.Blip2VisionConfig),
                           qformer_config=_qformer(T), text_config=_text(T, text, len(tok)),
                           num_query_tokens=4,
                           image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    return save(T.Blip2ForConditionalGeneration(config), processor, folder)


def instructblip(folder, text="opt"):
    """InstructBLIP: BLIP-2 whose Q-Former also reads the instruction (its own tokenizer);
    no chat template — the instruction as it is."""
    import transformers as T
    tok = word_tokenizer([], {})  # the processor adds <image>
    qtok = word_tokenizer([], {}, cls_token="<s>", sep_token="</s>")
    processor = T.InstructBlipProcessor(
        image_processor=T.BlipImageProcessor(size={"height": PX, "width": PX}), tokenizer=tok,
        qformer_tokenizer=qtok, num_query_tokens=4)
    config = T.InstructBlipConfig(
        vision_config=_blip_vision(T, T.InstructBlipVisionConfig), qformer_config=_qformer(T),
        text_config=_text(T, text, len(tok)), num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    return save(T.InstructBlipForConditionalGeneration(config), processor, folder)


def florence2(folder):
    """Florence-2: DaViT tower, BART encoder-decoder; no chat template — task tokens such as
    <MORE_DETAILED_CAPTION>, which its processor turns into a question."""
    import transformers as T
    tok = word_tokenizer(["<image>"], {"image_token": "<image>"},
                         extra=("Describe", "with", "paragraph", "shown", "in", "image."))
    images = T.CLIPImageProcessor(size={"height": PX, "width": PX}, do_center_crop=False)
    images.image_seq_length = 2  # one 1 × 1 map after strides 4·2·2·2, plus its pooled token
    processor = T.Florence2Processor(image_processor=images, tokenizer=tok)
    vision = T.Florence2VisionConfig(depths=[1, 1, 1, 1], embed_dim=[8, 8, 16, 16],
                                     num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
                                     window_size=2, projection_dim=32, drop_path_rate=0.0)
    text = T.BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, bos_token_id=2,
                        eos_token_id=3, decoder_start_token_id=3, forced_eos_token_id=3,
                        max_position_embeddings=128)
    config = T.Florence2Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    return save(T.Florence2ForConditionalGeneration(config), processor, folder)



def qwen2_vl(folder, family="qwen2_vl"):
    """Qwen2-VL (and Qwen2.5-VL: ``family="qwen2_5_vl"``): 8-px patches merged 2 × 2, so a
    32-px image is 4 <|image_pad|> tokens between <|vision_start|> and <|vision_end|>; M-RoPE."""
    import transformers as T
    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[family]
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    tok = word_tokenizer(["<|vision_start|>", "<|vision_end|>", *named.values()], named)
    pixels = dict(patch_size=8, merge_size=2, temporal_patch_size=2,
                  size={"shortest_edge": PX * PX, "longest_edge": PX * PX})
    processor = getattr(T, f"{prefix}Processor")(
        image_processor=T.Qwen2VLImageProcessor(**pixels),
        video_processor=T.Qwen2VLVideoProcessor(**pixels), tokenizer=tok,
        chat_template=chat("<|vision_start|><|image_pad|><|vision_end|>"))
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        vision.update(intermediate_size=32, out_hidden_size=32, fullatt_block_indexes=[0],
                      window_size=16)
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=2,
                eos_token_id=3, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [1, 1, 2]})
    config = getattr(T, f"{prefix}Config")(
        vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    return save(getattr(T, f"{prefix}ForConditionalGeneration")(config), processor, folder)


def hf_dual_encoder(folder, family="clip"):
    """transformers' CLIP (``family="clip"``) or SigLIP: one-layer towers of 16 features, 12-d
    (CLIP) or 16-d (SigLIP) joint vectors; texts end in </s> (CLIP reads its vector there) and
    are at most 16 tokens (SigLIP pads every text to that length)."""
    import transformers as T
    tok = word_tokenizer([], {}, close=True, model_max_length=16)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2)
    vision = dict(tower, image_size=PX, patch_size=8)
    text = dict(tower, vocab_size=len(tok), max_position_embeddings=16, pad_token_id=0,
                bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    if family == "clip":
        images = T.CLIPImageProcessor(size={"shortest_edge": PX},
                                      crop_size={"height": PX, "width": PX})
        processor = T.CLIPProcessor(image_processor=images, tokenizer=tok)
        model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision,
                                         projection_dim=12))
    else:
        processor = T.SiglipProcessor(
            image_processor=T.SiglipImageProcessor(size={"height": PX, "width": PX}),
            tokenizer=tok)
        model = T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def llava_next(folder):
    """LLaVA-NeXT: LLaVA with "any resolution" tiling; one 32-px grid point, so an image is its
    base view and one tile, each 4 × 4 patches, plus a newline token per tile row."""
    import transformers as T
    tok = word_tokenizer(["<image>"], {"image_token": "<image>"})
    processor = T.LlavaNextProcessor(
        image_processor=T.LlavaNextImageProcessor(size={"shortest_edge": PX},
                                                  crop_size={"height": PX, "width": PX},
                                                  image_grid_pinpoints=[[PX, PX]]),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat("<image>"))
    config = T.LlavaNextConfig(
        vision_config=T.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         image_size=PX, patch_size=8, projection_dim=16),
        text_config=llama(len(tok)), image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[PX, PX]], vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    torch.manual_seed(0)
    return save(T.LlavaNextForConditionalGeneration(config), processor, folder)


def llava_onevision(folder):
    """LLaVA-OneVision: SigLIP tower (no CLS), "any resolution" tiling as LLaVA-NeXT's with one
    32-px grid point, Qwen2 text model."""
    import transformers as T
    tok = word_tokenizer(["<image>", "<video>"], {"image_token": "<image>",
                                                  "video_token": "<video>"})
    pixels = dict(size={"height": PX, "width": PX}, image_grid_pinpoints=[[PX, PX]])
    processor = T.LlavaOnevisionProcessor(
        image_processor=T.LlavaOnevisionImageProcessor(**pixels),
        video_processor=T.LlavaOnevisionVideoProcessor(size={"height": PX, "width": PX}),
        tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=chat("<image>"))
    text = T.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         max_position_embeddings=512)
    config = T.LlavaOnevisionConfig(
        vision_config=T.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=PX, patch_size=8).to_dict(),
        text_config=text.to_dict(), image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=[[PX, PX]],
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(0)
    return save(T.LlavaOnevisionForConditionalGeneration(config), processor, folder)


def tiny_diffusion(folder):
    """A Stable Diffusion text-to-image pipeline rendering 16-px images (UNet, VAE and CLIP text
    tower of 8–16 features, the shared word tokenizer), for GENERATOR=diffusers → ``folder``."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tok = word_tokenizer([], extra=("a", "dog", "blue", "sky", "patches", "edges"))
    tok.model_max_length = 8
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_hidden_layers=1,
                                        max_position_embeddings=8, projection_dim=16))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                       scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder
