"""Chat rendering (exact strings), PromptBuilder (ids, pixels, image-token counts; the result is
accepted by transformers' own Qwen2.5-VL / InternVL forward) and PromptStream (per-epoch
shuffles, bad rows skipped once and counted, exact resume from a JSON state, no endless loop)."""
from __future__ import annotations

import json
import string
import warnings

import pytest
import torch
from PIL import Image

from eureka_megatron.data.chat import R1_SYSTEM_PROMPT, render_prompt
from eureka_megatron.data.dataset import PromptBuilder, PromptItem, PromptStream
from eureka_megatron.data.images import load_image
from eureka_megatron.data.jsonl import DataError, Row, load_rows
from eureka_megatron.data.synthetic import TASKS, synthetic_dataset, write_jsonl
from eureka_megatron.models.family import ChatTokens
from eureka_megatron.models.internvl import INTERNVL_CHAT
from eureka_megatron.models.internvl.images import internvl_pixels
from eureka_megatron.models.qwen2_5_vl import QWEN_CHAT
from eureka_megatron.models.qwen2_5_vl.images import qwen2_5_vl_pixels
from eureka_megatron.rollout.engine import Prompt
from tests import rollout_fixtures as F

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
            "<img>", "<IMG_CONTEXT>", "</img>"]


def char_tokenizer(family: str = "qwen2_5_vl", specials: bool = True):
    """One token per character; chat/image markers as special tokens, the family's image pad at
    the tiny test models' image id (255) and <|vision_start|> at theirs (253)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for c in sorted(set(string.printable)):
        vocab.setdefault(c, len(vocab))
    pad = "<|image_pad|>" if family == "qwen2_5_vl" else "<IMG_CONTEXT>"
    fixed = {pad: F.IMAGE, "<|vision_start|>": F.VSTART}
    if specials:
        free = iter(range(200, 250))
        for s in SPECIALS:
            vocab[s] = fixed.get(s) or next(free)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if specials:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    write_jsonl(synthetic_dataset(10, seed=1), out)
    return out


@pytest.fixture(scope="module")
def rows(data_dir):
    return load_rows(data_dir).rows


# --- chat ----------------------------------------------------------------------------------


def test_render_prompt_exact_strings():
    q = render_prompt(QWEN_CHAT, "How many?", [2, 1], "SYS")
    assert q == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
                 "<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n"
                 "<|im_start|>assistant\n")
    i = render_prompt(INTERNVL_CHAT, "Find x.", [3], None)  # no system turn at all
    assert i == ("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nFind x."
                 "<|im_end|>\n<|im_start|>assistant\n")
    # "<image>" placeholders put each image where it is (InternVL rows carry "<image>\n")
    p = render_prompt(INTERNVL_CHAT, "A: <image>\nB: <image>\nSame?", [1, 2], None)
    assert p == ("<|im_start|>user\nA: <img><IMG_CONTEXT></img>\n"
                 "B: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nSame?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(QWEN_CHAT, "text only", [], None) == \
        "<|im_start|>user\ntext only<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        render_prompt(QWEN_CHAT, "<image><image>", [4], None)
    custom = ChatTokens("[s]", "[e]", "{", "*", "}", image_sep=" ")
    assert render_prompt(custom, "q", [2], None) == "[s]user\n{**} q[e]\n[s]assistant\n"


def test_r1_system_prompt_asks_for_both_tags():
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag in R1_SYSTEM_PROMPT


# --- PromptBuilder ---------------------------------------------------------------------------


def test_qwen_builder(rows):
    tok = char_tokenizer("qwen2_5_vl")
    b = PromptBuilder("qwen2_5_vl", tok, system_prompt="SYS", max_prompt_length=512,
                      min_pixels=56 * 56, max_pixels=56 * 56)
    row = rows[0]
    item = b.build(row)
    assert isinstance(item, PromptItem) and isinstance(item.prompt, Prompt)
    assert (item.answer, item.row_id, item.source, item.meta) == (row.answer, row.id, row.source,
                                                                 row.meta)
    assert item.meta["task"] in TASKS
    # a 56x56 image: a 4x4 patch grid, 2x2 merged -> 4 LLM tokens
    expected_text = ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                     + "<|image_pad|>" * 4 + f"<|vision_end|>{row.question}<|im_end|>\n"
                     "<|im_start|>assistant\n")
    assert item.prompt.text == expected_text
    assert item.prompt.input_ids == tok(expected_text, add_special_tokens=False)["input_ids"]
    assert tok.decode(item.prompt.input_ids) == expected_text
    assert item.prompt.input_ids.count(F.IMAGE) == 4
    pv, grid = qwen2_5_vl_pixels([load_image(row.images[0])], min_pixels=56 * 56, max_pixels=56 * 56)
    assert set(item.prompt.mm_inputs) == {"pixel_values", "image_grid_thw"}
    assert torch.equal(item.prompt.mm_inputs["pixel_values"], pv)
    assert item.prompt.mm_inputs["image_grid_thw"].tolist() == [[1, 4, 4]] == grid.tolist()
    assert item.prompt.images == row.images


def test_internvl_builder_tiles_and_placeholders(tmp_path):
    Image.new("RGB", (112, 56), (9, 99, 199)).save(tmp_path / "wide.png")
    tok = char_tokenizer("internvl")
    b = PromptBuilder("internvl", tok, system_prompt=None, max_prompt_length=512, image_size=56,
                      max_tiles=6, use_thumbnail=True)
    row = Row(id="w", images=[str(tmp_path / "wide.png")], question="<image>\nWhat colour?",
              answer="blue", source="x.jsonl:3", meta={"task": "colour"})
    item = b.build(row)
    # 2x1 tiles + thumbnail = 3 tiles; (56/14)^2 * 0.5^2 = 4 tokens each
    assert item.prompt.text == ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 12 +
                                "</img>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n")
    assert item.prompt.input_ids.count(F.IMAGE) == 12
    pv, tiles = internvl_pixels([load_image(row.images[0])], image_size=56, max_tiles=6)
    assert tiles == [3] and set(item.prompt.mm_inputs) == {"pixel_values"}
    assert torch.equal(item.prompt.mm_inputs["pixel_values"], pv)
    assert item.meta == {"task": "colour"}


def test_row_system_prompt_wins(rows):
    b = PromptBuilder("qwen2_5_vl", char_tokenizer(), system_prompt="BUILDER", max_prompt_length=512)
    own = Row(**{**rows[0].__dict__, "system_prompt": "ROW"})
    assert b.build(own).prompt.text.startswith("<|im_start|>system\nROW<|im_end|>\n")
    assert b.build(rows[0]).prompt.text.startswith("<|im_start|>system\nBUILDER<|im_end|>\n")
    none = PromptBuilder("qwen2_5_vl", char_tokenizer(), system_prompt=None, max_prompt_length=512)
    assert none.build(rows[0]).prompt.text.startswith("<|im_start|>user\n")


def test_builder_errors(rows, tmp_path):
    tok = char_tokenizer()
    with pytest.raises(DataError, match="over max_prompt_length 30"):
        PromptBuilder("qwen2_5_vl", tok, system_prompt=None, max_prompt_length=30).build(rows[0])
    big = PromptBuilder("qwen2_5_vl", tok, system_prompt=None, max_prompt_length=10,
                        min_pixels=112 * 112, max_pixels=112 * 112)  # 16 image tokens
    with pytest.raises(DataError, match="16 image tokens alone exceed"):
        big.build(rows[0])
    b = PromptBuilder("qwen2_5_vl", tok, system_prompt=None, max_prompt_length=512)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG broken")
    bad = Row(id="j", images=[str(tmp_path / "junk.png")], question="q", answer="a", source="f:1")
    with pytest.raises(DataError, match="junk.png"):
        b.build(bad)
    sneaky = Row(**{**rows[0].__dict__, "question": "what is <|image_pad|>?"})
    with pytest.raises(DataError, match="5 <\\|image_pad\\|> tokens in the prompt ids, expected 4"):
        b.build(sneaky)
    marks = Row(**{**rows[0].__dict__, "question": "<image> and <image>"})
    with pytest.raises(DataError, match="placeholders"):
        b.build(marks)
    with pytest.raises(ValueError, match="does not have '<\\|image_pad\\|>' as one token"):
        PromptBuilder("qwen2_5_vl", char_tokenizer(specials=False), system_prompt=None,
                      max_prompt_length=512)
    with pytest.raises(ValueError, match="unknown model family"):
        PromptBuilder("llava", tok, system_prompt=None, max_prompt_length=512)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_built_prompt_runs_through_transformers(family, rows, tmp_path):
    """transformers' own forward checks image features against image tokens: our ids, pixels
    and grid must agree with the vision tower, and the pixels must reach the logits."""
    Image.new("RGB", (112, 56), (250, 10, 10)).save(tmp_path / "wide.png")
    kw = {"image_size": F.TILE, "max_tiles": 4} if family == "internvl" else {"max_pixels": 112 * 56}
    b = PromptBuilder(family, char_tokenizer(family), system_prompt="S", max_prompt_length=512, **kw)
    model = F.tiny_model(family)
    two = Row(id="2", images=[rows[1].images[0], str(tmp_path / "wide.png")],
              question="Which is red?", answer="2", source="t:1")
    for row in (rows[0], two):
        item = b.build(row)
        logits = F.full_forward_logits(model, item.prompt.input_ids, item.prompt.mm_inputs)
        assert logits.shape[0] == len(item.prompt.input_ids) and torch.isfinite(logits).all()
        changed = {k: (v + 0.5 if k == "pixel_values" else v) for k, v in item.prompt.mm_inputs.items()}
        other = F.full_forward_logits(model, item.prompt.input_ids, changed)
        assert not torch.allclose(logits[-1], other[-1])


# --- PromptStream ----------------------------------------------------------------------------


class CountingBuilder(PromptBuilder):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: dict[str, int] = {}

    def build(self, row):
        self.calls[row.id] = self.calls.get(row.id, 0) + 1
        return super().build(row)


def _builder(cls=PromptBuilder):
    return cls("qwen2_5_vl", char_tokenizer(), system_prompt=None, max_prompt_length=512)


@pytest.fixture
def rows_with_bad(tmp_path):
    write_jsonl(synthetic_dataset(10, seed=2), tmp_path)
    rows = load_rows(tmp_path).rows
    with open(rows[4].images[0], "wb") as f:
        f.write(b"corrupted after loading")
    return rows


def test_stream_epochs_shuffle_and_skips(rows_with_bad):
    rows = rows_with_bad
    good = {r.id for i, r in enumerate(rows) if i != 4}
    b = _builder(CountingBuilder)
    s = PromptStream(rows, b, seed=5)
    with pytest.warns(UserWarning, match=f"skipping prompt {rows[4].source}"):
        items = [it for _ in range(7) for it in s.next_batch(3)]  # 21 = 9 + 9 + 3
    ids = [it.row_id for it in items]
    assert set(ids[:9]) == good and set(ids[9:18]) == good and len(set(ids[18:])) == 3
    assert ids[:9] != ids[9:18] and s.epoch == 2  # a fresh shuffle each epoch
    assert s.skipped == 1 and s.skipped_sources[0].source == rows[4].source
    assert "corrupt" in s.skipped_sources[0].reason
    assert b.calls[rows[4].id] == 1  # a failed row is not retried in later epochs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = PromptStream(rows, _builder(), seed=6)
        assert [it.row_id for it in other.next_batch(9)] != ids[:9]
        ordered = PromptStream(rows, _builder(), seed=5, shuffle=False)
        assert [it.row_id for it in ordered.next_batch(9)] == [r.id for i, r in enumerate(rows) if i != 4]


def test_stream_resume_is_exact(rows_with_bad):
    rows = rows_with_bad
    with pytest.warns(UserWarning):
        full = PromptStream(rows, _builder(), seed=11)
        reference = [[it.row_id for it in full.next_batch(4)] for _ in range(7)]
    first = PromptStream(rows, _builder(), seed=11)
    with pytest.warns(UserWarning):
        got = [[it.row_id for it in first.next_batch(4)] for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    assert state["epoch"] == 1 and state["skipped"] == 1
    resumed = PromptStream(rows, _builder(), seed=11)
    resumed.load_state_dict(state)
    got += [[it.row_id for it in resumed.next_batch(4)] for _ in range(4)]
    assert got == reference
    assert resumed.skipped == 1 and resumed.state_dict() == full.state_dict()

    with pytest.raises(DataError, match="seed: saved 11, now 12"):
        PromptStream(rows, _builder(), seed=12).load_state_dict(state)
    with pytest.raises(DataError, match="num_rows"):
        PromptStream(rows[:-1], _builder(), seed=11).load_state_dict(state)


def test_stream_with_no_valid_rows_raises(tmp_path):
    rows = []
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"junk")
        rows.append(Row(id=str(i), images=[str(tmp_path / f"{i}.png")], question="q", answer="a",
                        source=f"d.jsonl:{i + 1}"))
    s = PromptStream(rows, _builder(), seed=0)
    with pytest.warns(UserWarning, match="d.jsonl"), pytest.raises(DataError, match="whole epoch of 3 rows"):
        s.next_batch(2)
    assert s.skipped == 3
    with pytest.raises(DataError):
        PromptStream([], _builder(), seed=0)


@pytest.mark.parametrize("config", [{"model_type": "internvl_chat", "force_image_size": 56},
                                    {"model_type": "internvl", "vision_config": {"image_size": [56, 56]}}])
def test_rl_prompt_builder_tiles_at_the_checkpoints_size(tmp_path, config):
    """The trainer's builder reads InternVL's tile size from model.hf's config.json (448 default
    would give 256 tokens a tile; these checkpoints use 56 -> 4)."""
    import json

    from eureka_megatron.data.sources import prompt_builder
    from eureka_megatron.config import RLConfig

    (tmp_path / "config.json").write_text(json.dumps(config))
    Image.new("RGB", (112, 56), (9, 99, 199)).save(tmp_path / "wide.png")
    cfg = RLConfig()
    cfg.model.hf = str(tmp_path)
    cfg.data.max_tiles, cfg.data.system_prompt = 6, None
    b = prompt_builder(cfg, "internvl", char_tokenizer("internvl"))
    row = Row(id="w", images=[str(tmp_path / "wide.png")], question="<image>\nWhat colour?",
              answer="blue", source="x.jsonl:3")
    assert b.build(row).prompt.input_ids.count(F.IMAGE) == 12  # 3 tiles x 4 tokens


QWEN3_VL_CONFIG = {"model_type": "qwen3_vl", "vision_config": {
    "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}}


@pytest.mark.parametrize("family,config,data,want", [
    # Qwen3-VL: the checkpoint's range (its preprocessor_config.json's) unless the run sets one
    ("qwen3_vl", QWEN3_VL_CONFIG, {}, (65536, 16777216, 16)),
    ("qwen3_vl", QWEN3_VL_CONFIG, {"min_pixels": 32 * 32, "max_pixels": 128 * 128},
     (32 * 32, 128 * 128, 16)),
    ("qwen3_vl", QWEN3_VL_CONFIG, {"max_pixels": 1 << 25}, (65536, 1 << 25, 16)),
    ("qwen3_vl_moe", {**QWEN3_VL_CONFIG, "model_type": "qwen3_vl_moe"}, {}, (65536, 16777216, 16)),
    # Qwen2.5-VL without a preprocessor_config.json: ImageOptions' 3136..1003520 unless set
    ("qwen2_5_vl", {"model_type": "qwen2_5_vl"}, {}, (56 * 56, 14 * 14 * 4 * 1280, 14)),
    ("qwen2_5_vl", {"model_type": "qwen2_5_vl"}, {"max_pixels": 28 * 28 * 16},
     (56 * 56, 28 * 28 * 16, 14)),
], ids=["qwen3_vl_checkpoint", "qwen3_vl_run", "qwen3_vl_run_max", "qwen3_vl_moe_checkpoint",
        "qwen2_5_vl_default", "qwen2_5_vl_run"])
def test_rl_pixel_range_is_the_checkpoints_unless_set(tmp_path, family, config, data, want):
    """data.min_pixels / max_pixels null (the default): the checkpoint's own range, so a Qwen3-VL
    run counts the image tokens its engines' processor (65536..16777216) counts."""
    from eureka_megatron.config import RLConfig
    from eureka_megatron.data.sources import prompt_builder

    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = RLConfig()
    cfg.model.hf = str(tmp_path)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.data.system_prompt = None
    o = prompt_builder(cfg.validate(), family, char_tokenizer()).options
    assert (o.min_pixels, o.max_pixels, o.patch_size) == want


def test_qwen3_vl_run_counts_the_image_tokens_of_the_checkpoints_processor(tmp_path):
    """A Qwen3-VL run with the default data section: the image tokens of a 300x200 image are
    what transformers' processor configured as the checkpoints' preprocessor_config.json gives
    (what SGLang counts); Qwen2.5-VL's range would give far fewer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from eureka_megatron.config import RLConfig
    from eureka_megatron.data.sources import prompt_builder

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_VL_CONFIG))
    im = Image.new("RGB", (300, 200), (9, 99, 199))
    im.save(tmp_path / "im.png")
    cfg = RLConfig()
    cfg.model.hf, cfg.data.system_prompt = str(tmp_path), None
    row = Row(id="a", images=[str(tmp_path / "im.png")], question="<image>\nWhat colour?",
              answer="blue", source="x.jsonl:1")
    got = prompt_builder(cfg, "qwen3_vl", char_tokenizer()).build(row).prompt.input_ids.count(F.IMAGE)
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 65536, "longest_edge": 16777216},
                                    patch_size=16, temporal_patch_size=2, merge_size=2,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)
    grid = proc(images=[im], return_tensors="pt")["image_grid_thw"][0]
    assert got == int(grid.prod()) // 4 == 70  # 224 x 320 pixels (up to >= 65536), not 54
    cfg.data.min_pixels, cfg.data.max_pixels = 56 * 56, 14 * 14 * 4 * 1280  # the old defaults
    assert prompt_builder(cfg, "qwen3_vl", char_tokenizer()).build(row).prompt.input_ids.count(
        F.IMAGE) == 54


@pytest.mark.parametrize("family,processor", [
    # Qwen2.5-VL's hub file (older form: top-level min/max_pixels over `size`)
    ("qwen2_5_vl", {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                    "merge_size": 2, "temporal_patch_size": 2,
                    "size": {"shortest_edge": 3136, "longest_edge": 1003520}}),
    # a fine-tuned checkpoint saved by today's processor: `size` only, a smaller range
    ("qwen2_5_vl", "saved:401408"),
    ("qwen3_vl", "saved:262144"),
], ids=["qwen2_5_vl_hub_file", "qwen2_5_vl_saved", "qwen3_vl_saved"])
def test_rl_image_tokens_follow_the_checkpoints_preprocessor_config(tmp_path, family, processor):
    """The pixel range of model.hf's preprocessor_config.json decides the image tokens, as
    transformers' processor loaded from the same directory (and so SGLang's) counts them --
    for a 3-megapixel image, above the processor class's default max of 1003520."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from eureka_megatron.config import RLConfig
    from eureka_megatron.data.sources import prompt_builder

    config = QWEN3_VL_CONFIG if family == "qwen3_vl" else {"model_type": family}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if isinstance(processor, str):  # what save_pretrained writes
        patch, norm = (16, dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)) \
            if family == "qwen3_vl" else (14, {})
        Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": int(processor[6:])},
                                 patch_size=patch, temporal_patch_size=2, merge_size=2,
                                 **norm).save_pretrained(tmp_path)
    else:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    im = Image.new("RGB", (2000, 1500), (9, 99, 199))
    im.save(tmp_path / "im.png")
    cfg = RLConfig()
    cfg.model.hf, cfg.data.system_prompt = str(tmp_path), None
    cfg.data.max_prompt_length = 8192  # 3834 image tokens in Qwen2.5-VL's hub range
    row = Row(id="a", images=[str(tmp_path / "im.png")], question="<image>\nWhat colour?",
              answer="blue", source="x.jsonl:1")
    got = prompt_builder(cfg, family, char_tokenizer()).build(row).prompt.input_ids.count(F.IMAGE)
    proc = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    want = int(proc(images=[im], return_tensors="pt")["image_grid_thw"][0].prod()) // 4
    assert got == want
    default = Qwen2VLImageProcessorPil(patch_size=proc.patch_size)  # the class's 1003520 max
    assert want != int(default(images=[im], return_tensors="pt")["image_grid_thw"][0].prod()) // 4
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json is not valid JSON"):
        prompt_builder(cfg, family, char_tokenizer())


@pytest.mark.parametrize("llm,overrides,match", [
    ("internlm2", ["data.max_tiles=6"], r"data\.max_tiles=6 \(SGLang: 12\)"),
    ("qwen2", ["data.use_thumbnail=false"], r"data\.use_thumbnail=False \(SGLang: True\)"),
    ("qwen2", ["data.max_tiles=6"], None),  # sent with every request
    ("internlm2", [], None),
    ("internlm2", ["data.max_tiles=6", "rollout.engine=hf"], None),
], ids=["internlm2_max_tiles", "thumbnail", "qwen2_max_tiles", "sglang_defaults", "hf_engine"])
def test_internvl_tiling_sglang_would_not_follow_is_refused_before_ranks_start(
        tmp_path, llm, overrides, match):
    """`train` (loop.describe, before any rank) refuses InternVL tiling that SGLang's processor
    would not reproduce (tests/sglang_api: the thumbnail always; an InternLM2 LLM's images always
    up to 12 tiles); max_tiles reaches it with each request otherwise."""
    from eureka_megatron.bench.convert import INTERNVL2_5_38B
    from eureka_megatron.config import ConfigError, load_rl_config
    from eureka_megatron.trainer.loop import describe

    config = json.loads(json.dumps(INTERNVL2_5_38B))
    if llm == "internlm2":
        config["llm_config"].update(architectures=["InternLM2ForCausalLM"], model_type="internlm2",
                                    bias=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"151667": {"content": "<IMG_CONTEXT>"}}}))
    base = [f"model.hf={tmp_path}", "rollout.engine=sglang", "parallel.tensor_parallel=8",
            "parallel.nproc=8", "parallel.sequence_parallel=true"]
    cfg = load_rl_config(None, base + overrides)
    if match is None:
        assert "internvl" in describe(cfg)
    else:
        with pytest.raises(ConfigError, match=match):
            describe(cfg)


def test_rl_pixel_range_errors_name_the_keys(tmp_path):
    from eureka_megatron.config import ConfigError, RLConfig
    from eureka_megatron.data.sources import image_options

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_VL_CONFIG))
    for data, match in (({"min_pixels": 0}, "data.min_pixels=0"),
                        ({"max_pixels": "big"}, "data.max_pixels='big'"),
                        ({"min_pixels": 4096, "max_pixels": 1024}, "data.min_pixels=4096 is above")):
        cfg = RLConfig()
        cfg.model.hf = str(tmp_path)
        for k, v in data.items():
            setattr(cfg.data, k, v)
        with pytest.raises(ConfigError, match=match):
            cfg.validate()
    cfg = RLConfig()
    cfg.model.hf, cfg.data.max_pixels = str(tmp_path), 128 * 128  # below the checkpoint's min
    with pytest.raises(ConfigError, match="set both data.min_pixels and data.max_pixels"):
        image_options(cfg.validate(), "qwen3_vl")


@pytest.mark.parametrize("chat", [QWEN_CHAT, INTERNVL_CHAT], ids=["qwen", "internvl"])
@pytest.mark.parametrize("system", [None, "Think first."])
@pytest.mark.parametrize("images", [0, 1, 2])
def test_jinja_chat_template_renders_the_trainer_prompt(chat, system, images):
    """transformers renders the template we write into checkpoints exactly as `render_prompt`
    (one pad per image: the processor expands it to the image's token count)."""
    from eureka_megatron.data.chat import jinja_chat_template
    from eureka_megatron.data.tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = jinja_chat_template(chat)
    content = [{"type": "image"}] * images + [{"type": "text", "text": "How many circles?"}]
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == render_prompt(chat, "How many circles?", [1] * images, system)
