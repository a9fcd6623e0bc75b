"""The PNG's `parameters` text both ways (issue 24 item 5, issue 27): what made the image (LoRA tags, A1111's short
hashes of the model, LoRA and embedding files, each equal to hashlib following A1111's definition), A1111-written
text read as A1111's parse_generation_parameters reads it, and --from-png, which runs a recorded generation again
to the same pixels, byte for byte, with the typed options overriding the PNG's."""

from __future__ import annotations

import hashlib
import json
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file
from test_single_file import ldm_state, write

from cli.hashes import hash_fields, sha256
from cli.main import main
from cli.png_info import options_from_png, read_parameters

FAST = ["--steps", "2", "--height", "16", "--width", "24", "--device", "cpu", "--dtype", "float32", "--quiet"]


def params(path) -> dict[str, str]:
    return read_parameters(Image.open(path).text["parameters"])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def lora_file(path, width: int = 32, seed: int = 0):
    """A Kohya LoRA on one text-encoder layer of the tiny model (its width is 32), with metadata in the header."""
    g = torch.Generator().manual_seed(seed)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    down, up = torch.randn(4, width, generator=g), torch.randn(width, 4, generator=g)
    state = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)}
    save_file(state, str(path), metadata={"ss_output_name": "something else"})
    return path


# ----------------------------------------------------------------------------- A1111's hashes


def test_hashes_equal_a1111s_definitions(tmp_path):
    """Model hash: sha256 of the whole file, 10 hex digits; Lora hashes: sha256 of a .safetensors file's bytes after
    its header (8-byte length n + n bytes), 12 digits; TI hashes: sha256 of the whole file, 12 digits."""
    model = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000.0)}, str(model))
    lora = lora_file(tmp_path / "fox, v2.safetensors")
    emb = tmp_path / "EasyNegative.safetensors"
    save_file({"emb_params": torch.ones(2, 32)}, str(emb), metadata={"name": "x"})
    data = lora.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    want_lora = hashlib.sha256(data[8 + n :]).hexdigest()[:12]
    assert want_lora != hashlib.sha256(data).hexdigest()[:12]  # the header is left out
    fields = hash_fields(str(model), [("fox, v2", lora)], [("EasyNegative", emb)])
    assert (
        fields
        == {
            "Model hash": hashlib.sha256(model.read_bytes()).hexdigest()[:10],
            "Lora hashes": f"fox v2: {want_lora}",  # A1111 drops the separators , and : from the name
            "TI hashes": f"EasyNegative: {hashlib.sha256(emb.read_bytes()).hexdigest()[:12]}",
        }
    )
    assert hash_fields(str(tmp_path), [], []) == {}  # a folder (Diffusers layout) has no checkpoint hash
    save_file({"emb_params": torch.zeros(2, 32)}, str(emb))  # a new file version: hashed again, not from the cache
    assert sha256(emb) == hashlib.sha256(emb.read_bytes()).hexdigest()


def test_png_names_the_model_loras_and_embeddings(tiny_model_dir, tmp_path, monkeypatch):
    """A single-file model's hash, every LoRA (a --lora file as an A1111 prompt tag; a tag as typed) with its hash,
    and the embeddings the prompts use (not one loaded but unused), each as hashlib gives it."""
    import cli.main

    model = write(ldm_state(tiny_model_dir), tmp_path / "tiny-ldm.safetensors")
    load = cli.main.load_pipeline  # the tiny single file needs the tiny configs, which the CLI has no option for
    monkeypatch.setattr(cli.main, "load_pipeline", lambda *a, **kw: load(*a, **kw, config=str(tiny_model_dir)))
    (tmp_path / "loras").mkdir()
    fox, owl = lora_file(tmp_path / "fox.safetensors", seed=1), lora_file(tmp_path / "loras" / "owl.safetensors")
    (tmp_path / "emb").mkdir()
    for name in ("EasyNegative", "badhandv4"):
        save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "emb" / f"{name}.safetensors"))
    out = tmp_path / "out.png"
    args = ["--model", str(model), *FAST, "--prompt", "a fox <lora:owl:0.5>", "--negative-prompt", "(easynegative:1.2)",
            "--lora", f"{fox}:0.8", "--lora-dir", str(tmp_path / "loras"), "--embeddings-dir", str(tmp_path / "emb"),
            "--seed", "1", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    got = params(out)

    def addnet(path):
        data = path.read_bytes()
        return hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0] :]).hexdigest()[:12]

    assert got["prompt"] == "a fox <lora:owl:0.5> <lora:fox:0.8>"
    assert got["Model hash"] == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert got["Model"] == "tiny-ldm"
    assert got["Lora hashes"] == f"owl: {addnet(owl)}, fox: {addnet(fox)}"  # in the order of the prompt's tags
    emb = (tmp_path / "emb" / "EasyNegative.safetensors").read_bytes()
    assert got["TI hashes"] == f"EasyNegative: {hashlib.sha256(emb).hexdigest()[:12]}"
    text = Image.open(out).text["parameters"]  # A1111's field order and quoting
    assert f"Model hash: {got['Model hash']}, Model: tiny-ldm" in text and "\nSteps: 2, Sampler: Euler" in text
    assert text.endswith(f'Lora hashes: "owl: {addnet(owl)}, fox: {addnet(fox)}", TI hashes: "{got["TI hashes"]}"')


# ----------------------------------------------------------------------------- reading A1111's text

A1111 = (
    "masterpiece, (a red fox:1.2), snow\nsecond line, <lora:add_detail:0.8>\n"
    "Negative prompt: EasyNegative, blurry\nlow quality\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.4, Clip skip: 2, "
    'ADetailer model: face_yolov8n.pt, ADetailer prompt: "a face, smiling: happy", Face restoration: CodeFormer, '
    'Lora hashes: "add_detail: 7c6bad76eb54, x: 123", TI hashes: "easynegative: c74b4e810b03", '
    "Hires upscaler: 4x-UltraSharp, Version: v1.10.1"
)


def test_reads_a1111_parameters_text():
    """A1111's format, written here by hand as A1111's create_infotext writes it (quote(): JSON when a value holds a
    comma, colon or newline): several prompt lines, a negative prompt of two lines, quoted values with commas and
    colons, hashes, unknown fields; the settings minsd runs from it, and the fields it does not implement."""
    got = read_parameters(A1111)
    assert got["prompt"] == "masterpiece, (a red fox:1.2), snow\nsecond line, <lora:add_detail:0.8>"
    assert got["negative_prompt"] == "EasyNegative, blurry\nlow quality"
    assert got["ADetailer prompt"] == "a face, smiling: happy"
    assert got["Lora hashes"] == "add_detail: 7c6bad76eb54, x: 123" and got["Version"] == "v1.10.1"
    options, missing = options_from_png(got)
    assert options == {"prompt": got["prompt"], "negative_prompt": got["negative_prompt"], "steps": 20,
                       "scheduler": "dpmpp_2m", "schedule": "karras", "guidance_scale": 7.0, "seed": 1, "width": 512,
                       "height": 768, "strength": 0.4, "clip_skip": 2}  # fmt: skip
    assert missing == ["ADetailer model: face_yolov8n.pt", 'ADetailer prompt: "a face, smiling: happy"',
                       "Face restoration: CodeFormer", "Hires upscaler: 4x-UltraSharp"]  # fmt: skip


@pytest.mark.parametrize(
    ("line", "scheduler", "schedule", "missing"),
    [
        ("Sampler: DPM++ 2M Karras", "dpmpp_2m", "karras", []),  # before A1111 1.9, the schedule in the name
        ("Sampler: Euler a, Schedule type: Automatic", "euler_a", "default", []),
        ("Sampler: Euler a, Schedule type: Karras", "euler_a", "default", ["Schedule type: Karras"]),
        ("Sampler: DDIM", "ddim", "default", []),
        ("Sampler: DPM++ 2M, Schedule type: Exponential", "dpmpp_2m", "exponential", []),
        ("Sampler: UniPC, Schedule type: Align Your Steps", "unipc", "default", ["Schedule type: Align Your Steps"]),
        ("Sampler: DPM fast", None, None, ["Sampler: DPM fast"]),
    ],
)
def test_sampler_names(line, scheduler, schedule, missing):
    options, got_missing = options_from_png(read_parameters(f"x\n{line}, Steps: 3, Seed: 2, CFG scale: 5"))
    assert (options.get("scheduler"), options.get("schedule"), got_missing) == (scheduler, schedule, missing)


def test_edge_cases_of_the_text():
    # fewer than 3 fields on the last line: it is prompt text (A1111's rule)
    assert read_parameters("a fox\nSteps: 20") == {"prompt": "a fox\nSteps: 20", "negative_prompt": ""}
    # only settings, no prompt; a quoted value with an escaped quote and a newline; a key with - and /
    got = read_parameters('Steps: 3, Seed: 4, CFG scale: 5, Note: "say \\"hi\\",\\nbye", Hires-fix/x: 2')
    assert got["prompt"] == "" and got["Note"] == 'say "hi",\nbye' and got["Hires-fix/x"] == "2"
    assert options_from_png(got)[1] == ['Note: "say \\"hi\\",\\nbye"', "Hires-fix/x: 2"]


# ----------------------------------------------------------------------------- --from-png


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[4:12, 6:18] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "loras").mkdir()
    lora_file(folder / "loras" / "owl.safetensors", seed=2)
    lora_file(folder / "loras" / "fox.safetensors", seed=3)  # --from-png finds --lora files in --lora-dir
    return folder


CASES = {  # every field minsd writes today
    "sampler": ["--prompt", "a fox, in: snow\nsecond line", "--negative-prompt", "blurry, low", "--scheduler",
                "dpmpp_2m", "--karras", "--steps", "3", "--guidance-scale", "6", "--seed", "7", "--height", "24",
                "--width", "16", "--clip-skip", "2"],
    "ddim-eta": ["--prompt", "a fox", "--scheduler", "ddim", "--eta", "0.5", "--seed", "3"],
    "schedule": ["--prompt", "a fox", "--scheduler", "DPM++ 2M SDE", "--schedule", "beta", "--seed", "8"],
    "pndm": ["--prompt", "a fox", "--scheduler", "pndm", "--seed", "1"],
    "img2img": ["--prompt", "a fox", "--init-image", "{init}", "--strength", "0.6", "--seed", "4"],
    "inpaint": ["--prompt", "a fox", "--init-image", "{init}", "--mask-image", "{mask}", "--mask-blur", "2"],
    "loras": ["--prompt", "a fox <lora:owl:0.7>", "--lora", "{fox}:0.6", "--lora-dir", "{loras}", "--seed", "5"],
    "batch": ["--prompt", "a fox", "--num-images", "2", "--seed", "9"],
    "hires": ["--prompt", "a fox", "--hires-scale", "1.5", "--hires-upscaler", "lanczos", "--hires-steps", "1",
              "--hires-denoise", "0.6", "--seed", "6"],
    "vae": ["--prompt", "a fox", "--vae", "{vae}", "--seed", "2"],
}  # fmt: skip
AGAIN = {"img2img": ["--init-image", "{init}"], "inpaint": ["--init-image", "{init}", "--mask-image", "{mask}"],
         "loras": ["--lora-dir", "{loras}"], "vae": ["--vae", "{vae}"]}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_from_png_makes_the_same_pixels(tiny_model_dir, inputs, tmp_path, case, capsys):
    """Generate through the CLI, then --from-png the result with only the model and the input files (which a PNG
    does not hold) given: the same pixels, byte for byte, and the same parameters text, with no warning."""
    paths = {k: inputs / f for k, f in {"init": "init.png", "mask": "mask.png", "fox": "loras/fox.safetensors"}.items()}
    paths["loras"], paths["vae"] = inputs / "loras", tiny_model_dir / "vae"
    base = ["--model", str(tiny_model_dir), *FAST]
    assert main([*base, *[a.format(**paths) for a in CASES[case]], "--output", str(tmp_path / "a.png")]) == 0
    first = tmp_path / ("a-1.png" if case == "batch" else "a.png")  # the batch's second image, seed 10
    capsys.readouterr()
    base = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--quiet"]  # no settings
    again = [*base, "--from-png", str(first), *[a.format(**paths) for a in AGAIN.get(case, [])]]
    assert main([*again, "--output", str(tmp_path / "b.png")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(first))
    want = Image.open(first).text["parameters"]
    want = want.replace(", Batch size: 2", "") if case == "batch" else want  # each image is made alone
    assert Image.open(tmp_path / "b.png").text["parameters"] == want


def test_typed_options_override_the_png(tiny_model_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), *FAST]
    assert main([*base, "--prompt", "a fox", "--seed", "3", "--output", str(tmp_path / "a.png")]) == 0
    args = [*base, "--from-png", str(tmp_path / "a.png"), "--steps", "3", "--prompt", "an owl"]
    assert main([*args, "--output", str(tmp_path / "b.png")]) == 0
    got = params(tmp_path / "b.png")
    assert (got["prompt"], got["Steps"], got["Seed"], got["Size"]) == ("an owl", "3", "3", "24x16")


def test_from_png_names_what_it_cannot_run_in_one_warning(tiny_model_dir, tmp_path, capsys):
    """An A1111 PNG: the unimplemented fields in one warning line, the informational ones (hashes, Version) in none,
    the other model in another line; the image is made."""
    png = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111.replace("512x768", "24x16").replace("Steps: 20", "Steps: 2"))
    Image.new("RGB", (24, 16)).save(png, pnginfo=info)
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--quiet"]
    assert main([*args, "--from-png", str(png), "--lora-dir", str(tmp_path), "--output", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err  # the prompt's <lora:add_detail> is not in --lora-dir: one error line
    assert "<lora:add_detail> in the prompt: no add_detail.safetensors" in err
    lora_file(tmp_path / "add_detail.safetensors")
    assert main([*args, "--from-png", str(png), "--lora-dir", str(tmp_path), "--output", str(tmp_path / "b.png")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 4, warnings
    assert warnings[0] == (f"min_pipeline.py: warning: --from-png {png}: minsd does not implement ADetailer model: "
                           'face_yolov8n.pt, ADetailer prompt: "a face, smiling: happy", Face restoration: CodeFormer, '
                           "Hires upscaler: 4x-UltraSharp; running without")  # fmt: skip
    assert f"the PNG's Model is v1-5-pruned-emaonly, running with {tiny_model_dir.name}" in warnings[1]
    assert "<lora:add_detail> in --lora-dir has hash " in warnings[2] and "the PNG's 7c6bad76eb54" in warnings[2]
    assert "made from an image (Denoising strength)" in warnings[3]
    assert not any(word in " ".join(warnings) for word in ("Version", "TI hashes", "Clip skip"))
    got = params(tmp_path / "b.png")
    assert (got["Sampler"], got["Schedule type"], got["Size"], got["Clip skip"]) == ("DPM++ 2M", "Karras", "24x16", "2")


@pytest.mark.parametrize("case", ["no-text", "not-png", "missing", "bad-number", "with-from-file"])
def test_from_png_errors_are_one_line(tiny_model_dir, tmp_path, capsys, case):
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    extra = []
    if case == "not-png":
        png.write_bytes(b"not an image")
    elif case == "missing":
        png = tmp_path / "none.png"
    elif case == "bad-number":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", "x\nSteps: many, Seed: 1, CFG scale: 7")
        Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    elif case == "with-from-file":
        extra = ["--from-file", str(png)]
    assert main(["--model", str(tiny_model_dir), "--from-png", str(png), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("min_pipeline.py: error: ") and "\n" not in err, err
    want = {"no-text": "holds no `parameters` text", "not-png": "cannot read the image", "missing": "no such file",
            "bad-number": "cannot read the PNG's Steps: 'many'", "with-from-file": "not both"}  # fmt: skip
    assert want[case] in err


def test_parameters_json_quoting_is_a1111s():
    """A1111's quote(): json.dumps(..., ensure_ascii=False) when a value holds a comma, colon or newline."""
    from cli.png_info import a1111_value

    assert a1111_value("café, crème") == json.dumps("café, crème", ensure_ascii=False) == '"café, crème"'
    assert a1111_value("café") == "café" and re.fullmatch(r'"a: b"', a1111_value("a: b"))
