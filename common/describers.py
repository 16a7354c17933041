"""Describers: a sentence for each mosaic, from the offline describer, a Hugging Face
vision-language model or an OpenAI-compatible server, with a prompt fitted to the layer's depth.

One call does it all — ``describe(mosaics, out, settings)``: mosaics (02's index, or another
stage's index of mosaics in the same format) in, ``03_descriptions.csv`` and its meta out. Stage 03
calls it on 02's mosaics; 09 (sub-concepts) and 11 (baskets) call it on their own, with the run's
describer settings, in the background (``Describing``), so that every sentence of a run comes from
one describer.

Backends (``DescriberSettings.backend``):
  offline  deterministic text from what can be measured (no model download needed): named
           colours, contrast, orientation and stripes of the crops for early layers
           (common/appearance.py); what the neuron's top images are for deep layers; both for the
           middle layers. "What they are" comes from the analysed model itself: the labels of its
           top images where they are labelled, else its own predictions, in its own class names
           (crops smaller than the image: the analysed model classifies them). For an ImageNet
           model, and with namer "reference" for any model, the reference classifier
           (EfficientNet-Lite0) names them instead, grouped into broader ImageNet kinds.
  hf       any Hugging Face image-text-to-text model (local folder or hub id), batched, in its
           family's prompt form (chat template, else PLAIN_PROMPTS; docs/vlm-families.md).
  openai   any OpenAI-compatible chat-completions server with image input (vLLM, Ollama, …);
           the API key is read from the environment variable named by ``api_key_env``.

A failed batch is described again neuron by neuron, and what still fails is a failed neuron with
its reason; a describer that fails on every neuron of the first batch stops the stage at once.
Every answer is journaled as it arrives (common/journal.py), keyed by everything it depends on,
so an interrupted run loses nothing and a rerun describes only what is new or failed.
"""
from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shlex
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from common import artefacts
from common.cli import StageError, add_settings, comma_list, escaped, settings_from, shard_slice
from common.io import plain_text, sweep_temporaries, write_csv
from common.journal import Journal, journal_path, read_journals
from common.mosaics import load_mosaic
from common.offline_describer import (ASKED_LABEL, OFFLINE_LABEL, OWN_LABEL, OfflineDescriber,
                                      classes_phrase, model_classify)
from common.processes import die_with_parent
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta

log = logging.getLogger("neuron-atlas.03_describe")

STAGE = "03_describe"  # the stage whose files ``describe`` writes, wherever it is called from
FIELDS = artefacts.columns(artefacts.Description)  # 03_descriptions.csv: the reader's columns
DEFAULT_PROMPTS = Path(__file__).with_name("prompts.yaml")
DEFAULT_HF_MODEL = "llava-hf/llava-1.5-7b-hf"  # the thesis's describer, for a GPU workstation
MAX_ANSWER_CHARS = 400        # longer answers are cut at a sentence end
WHOLE_AREA = 0.6             # a crop covering this share of the input counts as the whole image
TAIL_LINES = 20             # lines of a failed background describer's log shown


@dataclass(frozen=True)
class DescriberSettings:
    """Who describes the mosaics and how: 03's describer flags, and what 09 and 11 read from
    their ``--describe-args`` (the run's 03 flags, passed on by make). Each default is here only."""

    backend: str = field(default="offline", metadata={
        "help": "who writes the descriptions", "choices": ["offline", "hf", "openai"]})
    model: str | None = field(default=None, metadata={
        "help": f"hf: folder or hub id (default {DEFAULT_HF_MODEL}); openai: the server's model "
                f"name"})
    prompts: str = field(default=str(DEFAULT_PROMPTS), metadata={
        "help": "prompt file (YAML or JSON)"})
    domain: str = field(default="", metadata={
        "help": "what the images are, woven into every prompt, e.g. 'chest X-rays' (default: the "
                "prompt file's)"})
    keywords: str = field(default="", metadata={"help": "comma-separated terms of the domain"})
    levels: str = field(default="", metadata={
        "help": "explicit layer=level pairs (1 = earliest); other layers get a level by relative "
                "depth"})
    batch_size: int | None = field(default=None, metadata={
        "help": "neurons per batch (hf: 64)"})
    classify_crops: int = field(default=8, metadata={
        "help": "offline: crops per neuron the classifier labels where the receptive field is "
                "smaller than the image (whole-image fields reuse 01's labels and predictions)"})
    namer: str = field(default="model", metadata={
        "help": "offline: who says what the top images show: the analysed model (its labels, "
                "predictions and class names) or the shipped ImageNet reference classifier "
                "(EfficientNet-Lite0); ImageNet models always use the latter",
        "choices": ["model", "reference"]})
    analysed_model: str | None = field(default=None, metadata={
        "help": "offline: the model 01 ran (Make: MODEL), named again so that its file is loaded "
                "to classify crops; a file is never taken from metadata alone"})
    analysed_weights: str | None = field(default=None, metadata={
        "help": "offline: the weights 01 used (Make: WEIGHTS), named again likewise"})
    unsafe_pickle: bool = field(default=False, metadata={
        "help": "offline: the analysed model is a whole pickled checkpoint you trust (as 01's "
                "flag); needed to classify crops with it"})
    temperature: float = field(default=0.8, metadata={
        "help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=57, metadata={"help": "answer length limit"})
    seed: int = field(default=0, metadata={"help": "random seed of sampling"})
    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={
        "help": "openai: server URL"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "openai: name of the environment variable holding the API key"})
    concurrency: int = field(default=8, metadata={"help": "openai: parallel requests"})
    timeout: float = field(default=120.0, metadata={"help": "openai: seconds per request"})
    retries: int = field(default=3, metadata={"help": "openai: retries per request"})
    device: str = field(default="auto", metadata={"help": "hf/offline: auto, cpu, cuda …"})


def settings_parser() -> argparse.ArgumentParser:
    """A parser of the describer flags alone (what ``--describe-args`` holds)."""
    parser = argparse.ArgumentParser(prog="--describe-args", add_help=False)
    add_settings(parser, DescriberSettings)
    return parser


def parse_describe_args(text: str) -> DescriberSettings:
    """The describer settings in ``text`` (03's flags, as make passes them to 09 and 11)."""
    try:
        args, unknown = settings_parser().parse_known_args(shlex.split(text))
    except SystemExit:
        raise StageError(f"--describe-args {text!r}: not 03's describer flags (see "
                         f"03_describe.py --help)") from None
    if unknown:
        raise StageError(f"--describe-args: {' '.join(unknown)} is not a describer flag of 03 "
                         f"(see 03_describe.py --help)")
    return settings_from(DescriberSettings, args)


# ---------------------------------------------------------------------------------------------
# Prompts and levels


def load_prompts(path: str | Path) -> dict:
    """Read a prompt file (YAML or JSON) and check it has a domain section and ≥ 1 level."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise StageError(f"prompt file {path} not found; pass --prompts (default {DEFAULT_PROMPTS})")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh) if path.suffix == ".json" else yaml.safe_load(fh)
    parts = ("role", "describe", "avoid", "answer")
    levels = (data or {}).get("levels") or []
    bad = [i + 1 for i, lv in enumerate(levels) if not all(isinstance(lv.get(p), str) for p in parts)]
    if not levels or bad or "domain" not in data:
        raise StageError(f"prompt file {path} needs a 'domain' section and a list 'levels' whose "
                         f"entries have {', '.join(parts)} (bad levels: {bad or 'none listed'})")
    return data


def build_prompt(prompts: dict, level: int, domain: str = "", keywords: str = "") -> str:
    """The prompt for ``level`` (1-based): role, domain context, what to describe and avoid, form."""
    spec = prompts["levels"][level - 1]
    dom = prompts["domain"]
    parts = [spec["role"], dom["context"].format(domain=domain or dom["default"]),
             spec["describe"], spec["avoid"], spec["answer"]]
    if keywords and spec.get("keywords", False):
        parts.append(dom["keywords"].format(keywords=keywords))
    return " ".join(" ".join(p.split()) for p in parts)


def parse_levels(text: str) -> dict[str, int]:
    """Parse ``layer=level,layer=level`` (levels 1-based) into a dict."""
    out = {}
    for item in comma_list(text):
        layer, sep, level = item.rpartition("=")
        if not sep or not layer or not level.strip().isdigit():
            raise StageError(f"--levels expects layer=level pairs such as layer1=2, got {item!r}")
        out[layer.strip()] = int(level)
    return out


def assign_levels(layers: Sequence[str], n_levels: int, explicit: dict[str, int] | None = None
                  ) -> dict[str, int]:
    """Level of each layer: the explicit setting, else by relative depth among ``layers``.

    With as many layers as levels this is one level per layer; a single layer gets the middle
    level, since its relative depth is undefined.
    """
    explicit = explicit or {}
    wrong = {k: v for k, v in explicit.items() if not 1 <= v <= n_levels}
    if wrong:
        raise StageError(f"--levels {wrong}: levels run from 1 to {n_levels} in the prompt file")
    levels = {}
    for j, layer in enumerate(layers):
        if layer in explicit:
            levels[layer] = explicit[layer]
        elif len(layers) == 1:
            levels[layer] = (n_levels + 1) // 2
        else:
            levels[layer] = 1 + round(j * (n_levels - 1) / (len(layers) - 1))
    return levels


# ---------------------------------------------------------------------------------------------
# Post-processing of model answers

_ROLE_PREFIX = re.compile(r"^\s*(?:\[/INST\]|<\|assistant\|>|<\|im_start\|>assistant|"
                          r"(?:assistant|answer|description|response|gpt)\s*:)\s*", re.IGNORECASE)
_THINKING = re.compile(r"^\s*<think>.*?(?:</think>|$)", re.DOTALL)  # a reasoning model's notes
_REFUSAL = re.compile(r"^\s*(?:i\s*(?:am|'m)\s+(?:sorry|unable|not able)|i\s+can(?:no|')t|"
                      r"sorry\b|as an ai\b|unable to)", re.IGNORECASE)


def clean_answer(raw: str | None) -> tuple[str, str]:
    """Strip control characters, role prefixes, quotes and extra whitespace → (text, reason);
    reason set when unusable."""
    if raw is None:
        return "", "no answer"
    # Reasoning models served without a reasoning parser (Ollama, vLLM) put their thinking first.
    text = _THINKING.sub("", plain_text(raw))  # no escape codes or bidi tricks reach a page
    for _ in range(3):  # prefixes can stack, e.g. "ASSISTANT: Answer: ..."
        text = _ROLE_PREFIX.sub("", text, count=1).strip()
    text = text.strip("\"'`“”‘’ ").strip()
    if len(text) > MAX_ANSWER_CHARS:
        cut = text[:MAX_ANSWER_CHARS]
        text = cut[:cut.rfind(". ") + 1] if ". " in cut else cut
    if not re.search(r"[A-Za-z]", text):
        return "", "empty answer"
    if _REFUSAL.match(text):
        return "", f"refused: {text[:80]}"
    return text, ""


# ---------------------------------------------------------------------------------------------
# What each backend gets


class Neuron(NamedTuple):
    """One neuron to describe: where its mosaic is and the prompt for its level."""

    layer: str
    channel: int
    level: int
    mosaic: Path
    grid: int
    tile_px: int
    n_tiles: int
    prompt: str
    top_ids: np.ndarray = np.zeros(0, np.int64)  # read-only default: never modified in place
    whole: np.ndarray = np.zeros(0, bool)  # per top image: its receptive field spans the input


# ---------------------------------------------------------------------------------------------
# Hugging Face backend


# The prompt of a family whose processor has no chat template (model_type → format): the
# family's documented plain prompt, with the layer's prompt inside where the family reads
# instructions; {image} is the processor's image token, where the family wants it written (its
# processor expands it, or puts the image tokens in itself). docs/vlm-families.md lists them.
PLAIN_PROMPTS = {
    "paligemma": "{image}answer en {prompt}",  # a task prefix ("answer en": in English)
    "blip-2": "Question: {prompt} Answer:",  # BLIP-2's question-answering form
    "instructblip": "{prompt}",              # the instruction as it is (its Q-Former reads it too)
    "florence2": "<MORE_DETAILED_CAPTION>",  # task tokens only: free text is outside its training
}
ERROR_CHARS = 300  # a failure's reason is cut to this length


def failure_reason(err: BaseException) -> str:
    """``Type: message`` of a failed generation, one line, for the CSV and the log."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return "generation failed: " + text[:ERROR_CHARS]


class HFDescriber:
    """A Hugging Face image-text-to-text model of any family: its chat template where its
    processor has one, else the family's plain prompt (PLAIN_PROMPTS); one list of images per
    prompt; batched generation; only the answer decoded, whether the model repeats the prompt
    (decoder-only) or not (encoder-decoder). A batch that fails is tried again one neuron at a
    time, so that one bad input fails only itself."""

    backend = "hf"

    def __init__(self, model_id: str, device: str = "auto", batch_size: int = 64,
                 temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 57,
                 seed: int = 0):
        """Load ``model_id`` (folder or hub id): bf16 (else fp16) on a GPU, fp32 on the CPU."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from common.models import pick_device
        self.batch_size = batch_size
        gen = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            gen.update(temperature=temperature, top_p=top_p)
        dev = pick_device(device)
        dtype = torch.float32
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            processor = AutoProcessor.from_pretrained(model_id)
            model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype).to(dev)
        except (OSError, ValueError, ImportError) as err:
            raise StageError(
                f"cannot load vision-language model {model_id!r} ({err}). Give a local folder "
                f"with its weights (--model path/to/model, Make VLM=…), or download "
                f"it on a connected machine first (`hf download {model_id}`); a missing package "
                f"the model's code names is installed with pip; progress so far "
                f"is kept") from err
        self.model = model.eval()
        self.processor = processor
        # The model's own generation settings with ours on top, passed explicitly: BLIP-2 and
        # InstructBLIP hand generation to their language model, which would otherwise use its
        # own defaults instead of the checkpoint's.
        self.gen = copy.deepcopy(model.generation_config)
        self.gen.update(**gen)
        self.family = getattr(model.config, "model_type", "")
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"  # generation continues from the right end of each row
        self.model_label = model_id
        self.plain = None if getattr(processor, "chat_template", None) else \
            PLAIN_PROMPTS.get(self.family, "{prompt}")
        if self.plain is not None and self.family not in PLAIN_PROMPTS:
            log.warning("%s (%s) has no chat template and no known prompt format; it gets the "
                        "layer's prompt as plain text", model_id, self.family or "unknown family")
        torch.manual_seed(seed)

    def prompt_text(self, prompt: str) -> str:
        """The model's input text for one image and one user prompt: chat-templated, or the
        family's plain prompt."""
        if self.plain is not None:
            return self.plain.format(prompt=prompt,
                                     image=getattr(self.processor, "image_token", "<image>"))
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]):
        """The processor's tensors for a batch, on the model's device: each prompt with its own
        list of one image (processors that take several images per prompt — SmolVLM, Gemma 3,
        mllama — would read a flat list as all images of the first prompt)."""
        inputs = self.processor(images=[[im] for im in images],
                                text=[self.prompt_text(p) for p in prompts], return_tensors="pt",
                                padding=True).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        """Generate one answer per (image, prompt) in a single batch; decode the answer only."""
        import torch
        inputs = self.inputs(images, prompts)
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=self.gen)
        prompt_ids = inputs["input_ids"]
        # A decoder-only model returns the prompt and then the answer; an encoder-decoder model
        # (Florence-2, BLIP-2 with T5) the answer alone.
        width = prompt_ids.shape[1]
        if out.shape[1] >= width and torch.equal(out[:, :width].to(prompt_ids.device),
                                                 prompt_ids):
            out = out[:, width:]
        return self.processor.batch_decode(out, skip_special_tokens=True)

    def describe(self, neurons: Sequence[Neuron]) -> list[tuple[str | None, str]]:
        """(raw answer, error) per neuron. A failing batch (out of memory, an image or prompt
        the processor rejects) is tried again neuron by neuron; what still fails is that
        neuron's failure with its reason, and the rest of the batch is answered."""
        try:
            images = [load_mosaic(n.mosaic) for n in neurons]
            return [(a, "") for a in self.generate(images, [n.prompt for n in neurons])]
        except Exception as err:  # noqa: BLE001 (any failure of the model is one item's)
            if len(neurons) == 1:
                return [(None, failure_reason(err))]
            log.warning("a batch of %d neurons failed (%s); trying them one at a time",
                        len(neurons), failure_reason(err))
            self._free_memory()
            return [self.describe([n])[0] for n in neurons]

    def _free_memory(self) -> None:
        """Hand cached GPU memory back after a failed batch (out of memory most often)."""
        import torch
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible backend


class ServerUnreachable(Exception):
    """The server refused the connection (as opposed to a bad or missing answer)."""


def _refused(err: BaseException) -> bool:
    """True when ``err`` (an openai.APIConnectionError) comes from a refused connection."""
    while err is not None:
        if isinstance(err, ConnectionRefusedError) or type(err).__name__ == "ConnectError":
            return True
        err = err.__cause__ or err.__context__
    return False


def _root_cause(err: BaseException) -> str:
    """The innermost exception of a chain, as ``Type: message`` (what actually went wrong)."""
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"[:160]


def _server_says(body) -> str:
    """``: message`` of an error reply, as the server words it (vLLM: ``{"message": …}``;
    Ollama and OpenAI: ``{"error": {"message": …}}``, unwrapped by the client), else ""."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    message = body.get("message") if isinstance(body, dict) else None
    return f": {escaped(' '.join(message.split()))[:160]}" if isinstance(message, str) else ""


class OpenAIDescriber:
    """Chat-completions requests through the ``openai`` client, the mosaic as a data URL,
    ``concurrency`` at a time. The client retries timeouts, dropped connections, 408/409/429 and
    5xx with exponential back-off; what still fails is a failed neuron with its reason."""

    backend = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 3,
                 temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 57,
                 seed: int = 0):
        """Settings of the server; the key is read from ``api_key_env`` here and kept in memory."""
        import openai
        self.base_url = base_url
        self.model_name = model
        self.model_label = model
        self.batch_size = max(1, concurrency) * 4
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        # Local servers (vLLM, Ollama) started without a key accept any; the client needs one.
        self.client = openai.OpenAI(api_key=os.environ.get(api_key_env) or "none",
                                    base_url=base_url, timeout=timeout, max_retries=retries)
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_new_tokens,
                         "seed": seed}

    def _messages(self, neuron: Neuron) -> list[dict]:
        """The user message: the prompt and the mosaic as a base64 PNG data URL."""
        buf = io.BytesIO()
        load_mosaic(neuron.mosaic).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return [{"role": "user", "content": [{"type": "text", "text": neuron.prompt},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    def _one(self, neuron: Neuron) -> tuple[str | None, str]:
        """Describe one neuron → (raw answer, "") or (None, why it failed)."""
        import openai
        try:
            # The raw answer is parsed here, so that a body of the wrong kind is named as such.
            reply = self.client.chat.completions.with_raw_response.create(
                model=self.model_name, messages=self._messages(neuron), **self.sampling)
            body = reply.http_response.content
        except openai.APIStatusError as err:
            return None, f"HTTP {err.status_code}{_server_says(err.body)}"
        except openai.APITimeoutError:
            return None, f"timeout: no answer within {self.timeout:g} s"
        except openai.APIConnectionError as err:
            if _refused(err):
                raise ServerUnreachable(_root_cause(err)) from err
            return None, f"connection error: {_root_cause(err)}"
        except (openai.OpenAIError, OSError, ValueError) as err:  # anything else on the wire
            return None, f"request failed: {_root_cause(err)}"
        start = escaped(body[:80].decode("utf-8", "replace"))
        try:
            answer = json.loads(body)
        except ValueError:
            return None, f"the server's answer is not JSON: {start}"
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None, f"the server's answer is not a chat completion (no choices[0].message." \
                         f"content): {start}"
        if isinstance(content, list):  # some servers return content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is None and answer["choices"][0].get("finish_reason") == "length":
            # vLLM with a reasoning parser: the limit was reached while the model still thought
            return None, (f"the answer was cut at --max-new-tokens "
                          f"{self.sampling['max_tokens']} before any text (a reasoning model "
                          f"needs more)")
        if not isinstance(content, str):
            return None, f"the server's answer holds no text (choices[0].message.content): {start}"
        return content, ""

    def describe_as_completed(self, neurons: Sequence[Neuron]):
        """Yield (index into ``neurons``, (raw answer, error)) as each answer arrives, so that
        the caller can journal it at once."""
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            futures = {pool.submit(self._one, n): i for i, n in enumerate(neurons)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        except ServerUnreachable as err:
            raise StageError(
                f"cannot reach the server at {self.base_url} ({err}). Start it (e.g. `vllm serve "
                f"{self.model_name}`) or fix --base-url (Make BASE_URL=…); descriptions done so "
                f"far are kept and the next run continues from there") from err
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def describe(self, neurons: Sequence[Neuron]) -> list[tuple[str | None, str]]:
        """(raw answer, error) per neuron, in order."""
        out: list = [None] * len(neurons)
        for i, result in self.describe_as_completed(neurons):
            out[i] = result
        return out


# ---------------------------------------------------------------------------------------------
# Which answers are done


def pick(records: Sequence[dict], key: str) -> dict | None:
    """The record to use for a task: the last good one with ``key``, else the last with ``key``."""
    matching = [r for r in records if r.get("key") == key]
    good = [r for r in matching if not r.get("error") and not clean_answer(r.get("raw"))[1]]
    return (good or matching or [None])[-1]


def task_key(neuron: Neuron, backend: str, model: str, upstream: str, code: str) -> str:
    """Fingerprint of everything that determines a neuron's answer: its mosaic's bytes, the
    upstream runs, backend, model, prompt (and the describer's code for the offline backend)."""
    try:
        mosaic = hashlib.blake2b(Path(neuron.mosaic).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        mosaic = "unreadable"  # described as a failure; a later readable mosaic gets a new key
    parts = [upstream, backend, model, code, neuron.layer, neuron.channel, neuron.level,
             neuron.prompt, mosaic]
    if "#" in neuron.layer and len(neuron.top_ids):  # some of a neuron's crops (09's
        parts.append(neuron.top_ids.tolist())           # sub-concepts): which images they are
    text = json.dumps(parts)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def is_done(records: Sequence[dict], key: str) -> bool:
    """True when the journal holds a usable answer for the task fingerprinted ``key``."""
    rec = pick(records, key)
    return rec is not None and not rec.get("error") and not clean_answer(rec.get("raw"))[1]


# ---------------------------------------------------------------------------------------------
# Reading the inputs


def read_predictions(path: Path) -> dict[int, tuple[list[int], list[float]]]:
    """image id → (top-5 class indices, probabilities) from 01_predictions.csv."""
    return {p.image_id: (list(p.top5_idx), list(p.top5_prob))
            for p in artefacts.read_predictions(path) if p.top5_idx}


def covers_whole_input(rf: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                       input_size: tuple[int, int]) -> np.ndarray:
    """Per cell (ys[i], xs[i]): does its receptive field cover (nearly) all the network input?

    Nearly: at least WHOLE_AREA of the input's area, so that the classifier's label of the whole
    image stands for the crop (deep cells near the border see most, not all, of the image).
    """
    size_h, size_w, jump_h, jump_w, start_h, start_w = (float(v) for v in rf)
    cy, cx = start_h + jump_h * np.asarray(ys), start_w + jump_w * np.asarray(xs)
    h = np.clip(cy + size_h / 2, 0, input_size[0]) - np.clip(cy - size_h / 2, 0, input_size[0])
    w = np.clip(cx + size_w / 2, 0, input_size[1]) - np.clip(cx - size_w / 2, 0, input_size[1])
    return h * w >= WHOLE_AREA * input_size[0] * input_size[1]


def is_imagenet_model(meta01: dict) -> bool:
    """True when 01's model names ImageNet's 1000 classes (a meta from before class names were
    recorded counts as ImageNet: that was the only case then)."""
    if "classes" not in meta01:
        return True
    from common.imagenet import class_names
    return meta01["classes"] == class_names()


def read_labels_or_predictions(path: Path) -> dict[int, tuple[list[int], list[float]]]:
    """image id → its class as (indices, probs): the label where the image is labelled with a
    class of the model, else the model's own top-5 predictions, from 01_predictions.csv."""
    out = read_predictions(path)
    for p in artefacts.read_predictions(path):
        if p.label_idx >= 0:
            out[p.image_id] = ([p.label_idx], [1.0])
    return out


def is_reference_model(meta01: dict) -> bool:
    """True when 01 ran the reference classifier itself (its predictions are the reference view)."""
    spec = meta01.get("model") or {}
    return spec.get("name") == "efficientnet_lite0" and not spec.get("weights") and \
        not spec.get("random_init")


def make_neurons(mosaics_csv: Path, prompts: dict, levels_text: str, domain: str, keywords: str,
                 activations: Path | None) -> tuple[list[Neuron], dict[str, int]]:
    """One Neuron per mosaic row, with its level, prompt and (if known) top image ids."""
    rows = artefacts.read_mosaics(mosaics_csv)
    if not rows:
        raise StageError(f"{mosaics_csv} lists no mosaics; re-run stage 02")
    model_order, tops, input_size = [], {}, (0, 0)
    if activations is not None:
        model_order, input_size, tops = artefacts.read_activations(activations)
    order = artefacts.order_layers((r.layer for r in rows), model_order)
    levels = assign_levels(order, len(prompts["levels"]), parse_levels(levels_text))
    neurons = []
    for r in rows:
        layer, channel, grid, n_tiles = r.layer, r.channel, r.grid, r.n_tiles
        top_ids, whole = np.zeros(0, np.int64), np.zeros(0, bool)
        if r.source_layer in tops:  # a sub-concept's tiles are some of its neuron's top images
            top = tops[r.source_layer]
            ranks = np.array(r.ranks, np.int64) if r.ranks else np.arange(grid * grid)
            ranks = ranks[ranks < top.image_ids.shape[1]]
            top_ids = top.image_ids[channel, ranks]
            whole = covers_whole_input(top.rf, top.y[channel, ranks], top.x[channel, ranks],
                                       input_size) & (top_ids >= 0)
        neurons.append(Neuron(layer=layer, channel=channel, level=levels[layer],
                              mosaic=r.path, grid=grid, tile_px=r.tile_px, n_tiles=n_tiles,
                              prompt=build_prompt(prompts, levels[layer], domain, keywords),
                              top_ids=top_ids, whole=whole))
    return neurons, levels


def model_label_for(backend: str, model: str | None) -> str:
    """What the ``model`` column says for ``backend`` (known without loading anything)."""
    if backend == "offline":
        return OFFLINE_LABEL
    return model or (DEFAULT_HF_MODEL if backend == "hf" else "")


def make_describer(settings: DescriberSettings, n_levels: int, predictions: Path | None,
                   reuse_predictions: bool, meta01: dict | None = None):
    """Build the backend ``settings`` name. The offline backend names objects with the analysed
    model (namer "model", described by 01's ``meta01``) unless that model is an ImageNet
    classifier or the namer is "reference"."""
    s = settings
    if s.backend == "offline":
        from common.imagenet import class_names
        meta01 = meta01 or {}
        if s.namer == "model" and not is_imagenet_model(meta01):
            spec = meta01.get("model") or {}
            names = meta01.get("classes") or []
            return OfflineDescriber(
                n_levels, read_labels_or_predictions(predictions) if predictions else {}, names,
                classify_tiles=s.classify_crops, device=s.device,
                load_classifier=lambda: model_classify(meta01, s.analysed_model,
                                                       s.analysed_weights, s.unsafe_pickle,
                                                       s.device),
                phrase=classes_phrase, deep_from_images=True,
                model_label=OWN_LABEL.format(model=spec.get("name", "the analysed model")))
        preds = read_predictions(predictions) if predictions and reuse_predictions else {}
        return OfflineDescriber(n_levels, preds, class_names(), classify_tiles=s.classify_crops,
                                device=s.device, model_label=OFFLINE_LABEL if
                                is_imagenet_model(meta01) else ASKED_LABEL)
    if s.backend == "hf":
        return HFDescriber(s.model or DEFAULT_HF_MODEL, device=s.device,
                           batch_size=s.batch_size or 64, temperature=s.temperature,
                           top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=s.seed)
    if s.backend == "openai":
        if not s.model:
            raise StageError("--backend openai needs --model (the name the server knows the "
                             "model by) and --base-url")
        return OpenAIDescriber(s.base_url, s.model, api_key_env=s.api_key_env,
                               concurrency=s.concurrency, timeout=s.timeout, retries=s.retries,
                               temperature=s.temperature, top_p=s.top_p,
                               max_new_tokens=s.max_new_tokens, seed=s.seed)
    raise StageError(f"unknown backend {s.backend!r}: offline, hf or openai")


# ---------------------------------------------------------------------------------------------
# The one call: mosaics in, sentences out


def assemble(out: Path, neurons: Sequence[Neuron], keys: dict[tuple[str, int], str],
             describer_backend: str, model_label: str, metas: list[dict], args: dict,
             levels: dict[str, int]) -> list[dict] | None:
    """Write 03_descriptions.csv and its meta if every neuron has a journal record, else None."""
    records = read_journals(out)
    rows, missing = [], 0
    for n in neurons:
        rec = pick(records.get((n.layer, n.channel), []), keys[(n.layer, n.channel)])
        if rec is None:
            missing += 1
            continue
        text, reason = clean_answer(rec.get("raw")) if not rec.get("error") else ("", rec["error"])
        rows.append({"layer": n.layer, "channel": n.channel, "level": n.level, "description": text,
                     "backend": describer_backend, "model": model_label,
                     "status": "ok" if text else "failed", "reason": reason})
    if missing:
        return None
    meta_file = out.parent / f"{STAGE}.meta.json"
    retract_meta(meta_file)
    write_csv(out, rows, FIELDS)
    failed = [f"{r['layer']}:{r['channel']}" for r in rows if r["status"] == "failed"]
    reasons = Counter(r["reason"].split(":")[0] for r in rows if r["status"] == "failed")
    write_meta(meta_file, STAGE, args, outputs=[out], inputs=metas,
               backend=describer_backend, model=model_label, levels=levels,
               n_ok=len(rows) - len(failed), n_failed=len(failed), failed=failed[:200],
               failure_reasons=dict(reasons.most_common()))
    if failed:
        why = "; ".join(f"{n} × {reason}" for reason, n in reasons.most_common(3))
        # The offline describer's failures (a mosaic without tiles or without anything to
        # measure) come back the same on every try; a VLM's may not.
        retry = describer_backend != "offline"
        log.warning("%d of %d neurons have no description (%s): %s%s. Later stages leave them "
                    "out%s", len(failed), len(rows), why, ", ".join(failed[:10]),
                    " …" if len(failed) > 10 else "",
                    "; the stage stays out of date for make, and the next `make all` (or run of "
                    "this stage) asks again for those neurons only" if retry else "")
        if retry:
            os.utime(meta_file, (0, 0))  # older than any input: make runs the stage again
    log.info("%d descriptions → %s", len(rows), out)
    return rows


def stop_if_all_failed(failures: Counter, done: int, total: int, batch_size: int, backend: str,
                       model_label: str) -> None:
    """Stop the stage with one line naming the model and the cause when every neuron described
    so far failed and they are at least a full batch (or all there are): a model that cannot
    describe anything (wrong family, broken weights, a server that rejects every request) is
    reported at once, instead of after hours of failures. The journal keeps what was tried.
    Called only while no neuron of the shard has an answer from an earlier run (a rerun that asks
    again for a few failed neurons finishes, whatever they give). The offline describer's
    failures are the mosaics' own (nothing to measure), never its."""
    if backend == "offline" or not done or sum(failures.values()) < done or \
            done < min(total, batch_size):
        return
    reason, count = failures.most_common(1)[0]
    raise StageError(f"{model_label} ({backend}) failed on all {done} neurons tried so far "
                     f"({count} × {escaped(reason)}); nothing was described — check the model "
                     f"and its settings (--model, --backend), then run the stage again")


def code_version() -> str:
    """Fingerprint of the offline describer's code: its module, the appearance measures it puts
    in words, and this module (prompts, answer cleaning). Its sentences are written again when
    any of them changes; a VLM's are not."""
    from common import appearance, offline_describer
    text = b"".join(Path(m.__file__).read_bytes()
                    for m in (offline_describer, appearance, sys.modules[__name__]))
    return hashlib.sha256(text).hexdigest()[:12]


def describe(mosaics: Path, out: Path, settings: DescriberSettings = DescriberSettings(),
             activations: Path | None = None, predictions: Path | None = None, describer=None,
             shard: tuple[int, int] = (0, 1), merge_only: bool = False, skip_dead: bool = False,
             args: dict | None = None) -> list[dict] | None:
    """Describe the mosaics of ``mosaics`` (02's index format) into ``out`` with ``settings``:
    the shard's neurons not yet done are described and journaled, and the CSV and its meta are
    written once every neuron has an answer. ``activations`` and ``predictions`` (01's) give the
    layer order and what the top images are; ``skip_dead`` leaves out the neurons the triage
    flags dead. ``describer`` (any object with ``backend``, ``model_label``, ``describe(neurons)``
    and a batch size) replaces the backend ``settings`` name — tests pass fakes here.
    Returns the rows written, or None when other shards still have neurons to describe.
    """
    s = settings
    prompts = load_prompts(s.prompts)
    sweep_temporaries(out.parent)  # what a killed earlier run left half-written
    neurons, level_map = make_neurons(mosaics, prompts, s.levels, s.domain, s.keywords,
                                      activations)
    if skip_dead:
        from common.triage import dead_neurons
        if activations is None:
            raise StageError("--skip-dead needs --activations (its 01_stats/ folder is read)")
        dead = dead_neurons(activations.parent / "01_stats", level_map)
        neurons = [n for n in neurons if (n.layer, n.channel) not in dead]
        log.info("--skip-dead: %d neurons flagged dead or barely active are not described",
                 len(dead))
    metas = [read_meta(mosaics)] + [read_meta(p) for p in (activations, predictions) if p]
    lineage = merge_lineage(metas)  # refuse, before any work, inputs from different runs
    meta01 = read_meta(activations) if activations else {}
    if describer is None and not merge_only:
        describer = make_describer(s, len(prompts["levels"]), predictions,
                                   is_reference_model(meta01), meta01)
    backend_name = describer.backend if describer else s.backend
    model_label = describer.model_label if describer else model_label_for(s.backend, s.model)
    # What every answer depends on besides its own mosaic and prompt: the mosaics' and the
    # analysed model's runs (its activations, labels and predictions), its class names, and who
    # names objects; the offline text also depends on its code, a VLM's does not.
    upstream = json.dumps([lineage.get("02_mosaics", metas[0].get("fingerprint", "")),
                           lineage.get("01_extract", ""), meta01.get("model"),
                           meta01.get("classes"), s.namer])
    code = code_version() if backend_name == "offline" else ""
    keys = {(n.layer, n.channel): task_key(n, backend_name, model_label, upstream, code)
            for n in neurons}

    if not merge_only:
        mine = [neurons[i] for i in shard_slice(len(neurons), shard)]
        done = read_journals(out)
        todo = [n for n in mine if not is_done(done.get((n.layer, n.channel), []),
                                               keys[(n.layer, n.channel)])]
        log.info("%s backend: %d of %d neurons of shard %d/%d to describe (%d already done)",
                 backend_name, len(todo), len(mine), shard[0], shard[1], len(mine) - len(todo))
        size = max(1, s.batch_size or getattr(describer, "batch_size", 16))
        # A backend that answers neuron by neuron hands each answer over as it arrives.
        stream = getattr(describer, "describe_as_completed", None)
        failures: Counter = Counter()  # reason → neurons, of this run's answers
        with Journal(journal_path(out, shard)) as journal, \
                tqdm(total=len(todo), desc="03 describe", unit="neuron", disable=None) as bar:
            for start in range(0, len(todo), size):
                batch = todo[start:start + size]
                answers = stream(batch) if stream else enumerate(describer.describe(batch))
                for i, (raw, error) in answers:
                    n = batch[i]
                    journal.add({"layer": n.layer, "channel": n.channel, "level": n.level,
                                 "key": keys[(n.layer, n.channel)], "raw": raw, "error": error})
                    reason = error or clean_answer(raw)[1]
                    if reason:
                        failures[reason] += 1
                    bar.update()
                journal.sync()
                if len(todo) == len(mine):  # nothing described before: the model may not work
                    stop_if_all_failed(failures, start + len(batch), len(todo), size,
                                       backend_name, model_label)
    rows = assemble(out, neurons, keys, backend_name, model_label, metas, dict(args or {}),
                    level_map)
    if rows is None and shard[1] == 1 and not merge_only:
        raise StageError("some neurons still have no journal record after describing them all "
                         "(see the warnings above); run the stage again to describe them")
    if rows is None:
        log.info("shard %d/%d done; %s is written once every shard has finished (or run with "
                 "--merge)", shard[0], shard[1], out.name)
        if merge_only:
            raise StageError("cannot merge: some neurons have no description yet with these "
                             "settings; run the missing shards (--shard i/N) first")
    return rows


# ---------------------------------------------------------------------------------------------
# Describing in the background (09's sub-concepts, 11's baskets)


def _can_fork() -> bool:
    """Whether the describer may run in a fork of this process (fork exists, CUDA not started
    here: CUDA does not survive a fork)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    torch = sys.modules.get("torch")
    return not (torch is not None and torch.cuda.is_initialized())


def _child(job: dict, log_path: str, parent_pid: int) -> None:
    """Body of the background process: tied to its parent, output to ``log_path``, one thread
    for torch and BLAS (the parent goes on working), then ``describe(**job)``; a StageError
    becomes one line in the log and exit status 2."""
    from common.cli import exit_on_stage_error, setup_logging
    from common.threads import single_threaded
    die_with_parent(parent_pid)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # New streams on the redirected descriptors: the inherited ones may write elsewhere (a test
    # runner's capture, for one).
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    setup_logging()
    import torch
    torch.set_num_threads(1)
    exit_on_stage_error(lambda _argv: single_threaded(describe)(**job))()


class Describing:
    """``describe`` at work in a child process on a mosaic index of another stage: ``result()``
    waits for its sentences, ``stop()`` ends it early. The child is a fork of the caller where
    it can be (it starts with torch and the describer already imported, instead of spending
    seconds importing them again), else a fresh interpreter; either way it dies with the caller,
    and its output goes to ``03_describe.log`` beside ``out``."""

    def __init__(self, index: Path, out: Path, settings: DescriberSettings,
                 levels: dict[str, int], activations: Path | None = None,
                 predictions: Path | None = None):
        """Start describing the mosaics of ``index`` into ``out`` with ``settings``; ``levels``
        (pseudo-layer → the level of the real layer it stands for) override the settings' own;
        ``activations`` and ``predictions`` as for ``describe``."""
        self.index, self.out = index, out
        self.log_path = out.parent / "03_describe.log"
        if levels:
            settings = dataclasses.replace(
                settings, levels=",".join(f"{name}={level}" for name, level in levels.items()))
        args = {"mosaics": str(index), "out": str(out), "activations": activations and
                str(activations), "predictions": predictions and str(predictions),
                **asdict(settings)}
        job = {"mosaics": index, "out": out, "settings": settings, "activations": activations,
               "predictions": predictions, "args": args}
        log.info("describing %d mosaics of %s", len(artefacts.read_mosaics(index)), index)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.method = "fork" if _can_fork() else "spawn"
        if self.method == "fork":
            import torch  # noqa: F401  (loaded once here: the child inherits them)
            import torchvision  # noqa: F401
        self._process = multiprocessing.get_context(self.method).Process(
            target=_child, args=(job, str(self.log_path), os.getpid()), daemon=True)
        self._process.start()

    def result(self) -> dict[tuple[str, int], str]:
        """Wait for the child → (pseudo-layer, channel) → sentence ("" where it could not
        describe); a failed child stops the caller, with the end of its log."""
        self._process.join()
        if self._process.exitcode != 0:
            lines = [line for line in (self.log_path.read_text(errors="replace").splitlines()
                                       if self.log_path.exists() else []) if line.strip()]
            for line in lines[-TAIL_LINES:]:
                log.error("03: %s", line)
            raise StageError(f"describing the mosaics of {self.index} failed: "
                             f"{lines[-1] if lines else 'no output'} (the end of its log "
                             f"{self.log_path} is above)")
        return {d.key: d.description if d.status == "ok" else ""
                for d in artefacts.read_descriptions(self.out)}

    def stop(self) -> None:
        """End the child if it is still running (the caller failed first): no process is left
        behind."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join()


def describe_index(index: Path, out: Path, settings: DescriberSettings,
                   levels: dict[str, int]) -> dict[tuple[str, int], str]:
    """Describe the mosaics of ``index`` in a child process and wait: (pseudo-layer, channel) →
    sentence ("" where the describer failed)."""
    return Describing(index, out, settings, levels).result()
