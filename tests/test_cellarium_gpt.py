"""CellariumGPT: attention backends, prompt/query masking, muP scaling, training on real cells, the train-gpt step."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import PBMC4K, require, run_cli

from cellarium_steps.models import CellariumGPT
from cellarium_steps.models._transformer import flex_attention_available, prompt_diagonal_mask
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.recipe import RECIPE_KEY, load_checkpoint
from cellarium_steps.steps.cli import main as cli_main
from cellarium_steps.transforms.gpt_tokenizer import GPTTokenizer, gather_counts, tokenize_counts

N_GENES = 200
GENE_VALUE_VOCAB = 16
N_CELL_TYPES = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads run these small matmuls ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(backend: str = "torch", d_model: int = 32, mup: bool = False, seed: int = 0,
                **kwargs) -> CellariumGPT:
    torch.manual_seed(seed)
    arguments = {
        "categorical_token_size_dict": {"gene_id": N_GENES, "gene_value": GENE_VALUE_VOCAB, "cell_type": N_CELL_TYPES},
        "d_model": d_model, "d_ffn": 2 * d_model, "n_heads": 2, "n_blocks": 2, "dropout_p": 0.0, "use_bias": True,
        "attention_backend": backend, "attention_softmax_fp32": False,
        "loss_scale_dict": {"gene_value": 1.0, "cell_type": 0.5},
        "mup_base_d_model": 32 if mup else None, "mup_base_d_ffn": 64 if mup else None,
    }
    return CellariumGPT(**{**arguments, **kwargs})


def synthetic_tokens(n: int = 6, c_genes: int = 24, seed: int = 1) -> dict:
    """c_genes gene tokens (about half prompt) and a queried cell_type token at the end, per cell."""
    generator = torch.Generator().manual_seed(seed)
    c = c_genes + 1
    gene_id_nc = torch.zeros(n, c, dtype=torch.long)
    gene_id_nc[:, :c_genes] = torch.rand(n, N_GENES, generator=generator).topk(c_genes, 1).indices
    count_nc = torch.poisson(torch.full((n, c), 3.0), generator=generator)
    is_gene_nc = torch.arange(c) < c_genes
    prompt_mask_nc = (torch.rand(n, c, generator=generator) < 0.5) & is_gene_nc
    prompt_mask_nc[:, 0] = True  # at least one prompt token per cell
    query_mask_nc = ~prompt_mask_nc & is_gene_nc
    cell_type_nc = torch.zeros(n, c, dtype=torch.long)
    cell_type_nc[:, -1] = N_CELL_TYPES  # the mask token: the cell type is queried
    gene_nc = is_gene_nc.expand(n, c)
    return {
        "token_value_nc_dict": {
            "gene_id": gene_id_nc,
            "gene_value": torch.log1p(count_nc) * prompt_mask_nc,
            "gene_query_mask": query_mask_nc.float(),
            "total_mrna_umis": torch.full((n, c), 8.0),
            "cell_type": cell_type_nc,
        },
        "token_mask_nc_dict": {
            "gene_id": gene_nc, "gene_value": gene_nc, "gene_query_mask": gene_nc, "total_mrna_umis": gene_nc,
            "cell_type": ~gene_nc,
        },
        "prompt_mask_nc": prompt_mask_nc,
        "label_nc_dict": {
            "gene_value": count_nc.clamp(0, GENE_VALUE_VOCAB - 1).long(),
            "cell_type": torch.randint(0, N_CELL_TYPES, (n, 1), generator=generator).expand(n, c).clone(),
        },
    }


def predict(model: CellariumGPT, tokens: dict) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model.predict(tokens["token_value_nc_dict"], tokens["token_mask_nc_dict"], tokens["prompt_mask_nc"])


def available_backends() -> list:
    params = [pytest.param("torch"), pytest.param("math")]
    params.append(pytest.param("mem_efficient", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="mem_efficient attention has CUDA kernels only; no GPU here")))
    params.append(pytest.param("flex", marks=pytest.mark.skipif(
        not flex_attention_available(), reason=f"torch {torch.__version__} has no flex_attention")))
    return params


# ---------------------------------------------------------------------------------------------------------------
# Attention


@pytest.mark.parametrize("backend", available_backends())
def test_attention_backends_give_the_same_logits(backend: str) -> None:
    device = "cuda" if backend == "mem_efficient" else "cpu"
    reference = small_model("torch").to(device)
    model = small_model(backend).to(device)
    model.load_state_dict(reference.state_dict())
    tokens = synthetic_tokens()
    tokens = {key: {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)
              for key, value in tokens.items()}
    expected, actual = predict(reference, tokens), predict(model, tokens)
    assert set(actual) == {"gene_value", "cell_type"}
    assert actual["gene_value"].shape == (6, 25, GENE_VALUE_VOCAB) and actual["cell_type"].shape == (6, 25, N_CELL_TYPES)
    for key in expected:
        assert (actual[key] - expected[key]).abs().max().item() < 1e-5, key


def test_prompt_diagonal_mask() -> None:
    prompt_mask_nc = torch.tensor([[True, False, True, False]])
    expected = torch.tensor([[True, False, True, False], [True, True, True, False],
                             [True, False, True, False], [True, False, True, True]])
    assert torch.equal(prompt_diagonal_mask(prompt_mask_nc)[0], expected)


@pytest.mark.parametrize("backend", ["torch", pytest.param("flex", marks=pytest.mark.skipif(
    not flex_attention_available(), reason="no flex_attention in this torch"))])
def test_a_query_never_sees_another_query(backend: str) -> None:
    model = small_model(backend)
    tokens = synthetic_tokens()
    before = predict(model, tokens)["gene_value"]
    prompt_mask_nc = tokens["prompt_mask_nc"]
    cell = 0
    queries = torch.nonzero(tokens["token_value_nc_dict"]["gene_query_mask"][cell] > 0).ravel()
    prompts = torch.nonzero(prompt_mask_nc[cell]).ravel()
    changed, others = int(queries[0]), queries[1:]

    # A different gene asked at one query position: only that position's prediction moves.
    gene_id_nc = tokens["token_value_nc_dict"]["gene_id"]
    used = set(gene_id_nc[cell].tolist())
    gene_id_nc[cell, changed] = next(g for g in range(N_GENES) if g not in used)
    after = predict(model, tokens)["gene_value"]
    assert (after[cell, changed] - before[cell, changed]).abs().max() > 1e-4
    assert (after[cell, others] - before[cell, others]).abs().max() < 1e-6
    assert (after[cell, prompts] - before[cell, prompts]).abs().max() < 1e-6  # prompts see only prompts
    assert torch.equal(after[1:], before[1:])  # other cells are untouched

    # A different prompt value: every query's prediction moves.
    tokens["token_value_nc_dict"]["gene_value"][cell, prompts[0]] += 2.0
    moved = predict(model, tokens)["gene_value"]
    assert ((moved[cell, others] - after[cell, others]).abs().amax(-1) > 1e-5).all()


# ---------------------------------------------------------------------------------------------------------------
# muP


def _logit_std_after_adam_steps(d_model: int, mup: bool, steps: int = 3, lr: float = 1e-2) -> tuple[float, float]:
    model = small_model(d_model=d_model, mup=mup)
    model.train()
    evaluation = synthetic_tokens(n=16, seed=100)
    init_std = predict(model, evaluation)["gene_value"].std().item()
    model.train()
    optimizer = torch.optim.Adam(model.optimizer_param_groups(lr))
    for step in range(steps):
        tokens = synthetic_tokens(n=16, seed=step)
        loss = model(**tokens)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return init_std, predict(model, evaluation)["gene_value"].std().item()


def test_mup_keeps_the_output_logit_scale_as_width_grows() -> None:
    """The muP coordinate check: logits after a few Adam steps at one learning rate, widths 32 and 128.

    Under the standard parametrisation Adam moves every readout weight by ~lr, so the logits' change
    grows with width; under muP (1/width output multiplier, 1/width learning rate of hidden matrices)
    it stays put. At initialisation muP logits shrink with width (the muP readout starts near 0).
    """
    ratios = {}
    for mup in (False, True):
        init_base, trained_base = _logit_std_after_adam_steps(32, mup)
        init_wide, trained_wide = _logit_std_after_adam_steps(128, mup)
        ratios[mup] = trained_wide / trained_base
        print(f"mup={mup}: logit std init {init_base:.3f} -> {init_wide:.3f}, after 3 Adam steps "
              f"{trained_base:.3f} -> {trained_wide:.3f} (x{ratios[mup]:.2f} for 4x width)")
    assert 0.5 <= ratios[True] <= 2.0
    assert ratios[False] > 1.5 and ratios[False] > 1.5 * ratios[True]


def test_mup_at_base_width_is_the_standard_model() -> None:
    tokens = synthetic_tokens()
    standard, mup = small_model(mup=False), small_model(mup=True)
    assert torch.equal(predict(standard, tokens)["gene_value"], predict(mup, tokens)["gene_value"])
    wide = small_model(d_model=128, mup=True)
    scales = wide.lr_scale_dict()
    assert scales["transformer.blocks.0.attention.Wq.weight"] == pytest.approx(0.25)
    assert scales["transformer.blocks.1.ffn.dense2.weight"] == pytest.approx(0.25)
    assert scales["token_embedding.embedding_dict.gene_id.weight"] == 1.0
    assert wide.output_logits_scale == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and training on real cells


def _torch_csr(x: sp.csr_matrix) -> torch.Tensor:
    return torch.sparse_csr_tensor(torch.from_numpy(x.indptr).long(), torch.from_numpy(x.indices).long(),
                                   torch.from_numpy(x.data), size=x.shape, check_invariants=False)


def test_tokenizer_gathers_clips_and_hides_query_counts() -> None:
    rng = np.random.default_rng(0)
    x = sp.random(8, 50, density=0.3, random_state=0, format="csr", dtype=np.float32)
    x.data = rng.integers(1, 40, x.nnz).astype(np.float32)
    x_ng = _torch_csr(x)
    dense = torch.from_numpy(x.toarray())
    torch.manual_seed(0)
    batch = tokenize_counts(x_ng, dense.sum(1), context_len=20, gene_value_vocab_size=10, prompt_fraction=0.25)
    gene_id_nc = batch["token_value_nc_dict"]["gene_id"]
    assert all(len(set(row.tolist())) == 20 for row in gene_id_nc)  # distinct genes per cell
    count_nc = dense.gather(1, gene_id_nc)
    assert torch.equal(gather_counts(x_ng, gene_id_nc), count_nc)
    assert torch.equal(gather_counts(x_ng.to_sparse_coo(), gene_id_nc), count_nc)
    prompt_nc = batch["prompt_mask_nc"]
    assert prompt_nc.sum(1).tolist() == [5] * 8
    assert torch.allclose(batch["token_value_nc_dict"]["gene_value"], torch.log1p(count_nc) * prompt_nc)
    assert torch.equal(batch["label_nc_dict"]["gene_value"], count_nc.clamp(max=9).long())
    weight_nc = batch["label_weight_nc_dict"]["gene_value"]
    assert weight_nc[prompt_nc].sum() == 0 and weight_nc.sum().item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def pbmc4k_top_genes() -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """pbmc4k's raw counts restricted to its 500 most-counted genes, and each cell's total UMIs."""
    adata = ad.read_h5ad(require(PBMC4K))
    x = adata.X.tocsr().astype(np.float32)
    total_n = np.asarray(x.sum(1)).ravel()
    keep = np.sort(np.argsort(-np.asarray(x.sum(0)).ravel(), kind="stable")[:500])
    return x[:, keep].tocsr(), np.asarray(adata.var_names)[keep], total_n


def test_training_on_pbmc4k_lowers_the_gene_value_loss(pbmc4k_top_genes) -> None:
    x, genes, total_n = pbmc4k_top_genes
    k, held_out = 32, np.arange(1920, x.shape[0])
    torch.manual_seed(0)
    model = CellariumGPT({"gene_id": len(genes), "gene_value": k}, d_model=64, d_ffn=128, n_heads=2, n_blocks=2,
                         dropout_p=0.0, use_bias=True, attention_backend="torch", attention_softmax_fp32=True,
                         loss_scale_dict={"gene_value": 1.0})
    torch.manual_seed(123)
    evaluation = GPTTokenizer(genes, 32, k, prompt_fraction=0.5)(_torch_csr(x[held_out]), genes,
                                                                 torch.from_numpy(total_n[held_out]))

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(**evaluation)["gene_value_loss"].item()
        model.train()
        return loss

    # The loss of the best gene-blind guess: the training cells' histogram of clipped counts.
    histogram_k = np.bincount(np.minimum(x[:1920].toarray(), k - 1).astype(int).ravel(), minlength=k) + 0.5
    log_p_k = torch.from_numpy(np.log(histogram_k / histogram_k.sum())).float()
    weight_nc = evaluation["label_weight_nc_dict"]["gene_value"]
    histogram_loss = float((-log_p_k[evaluation["label_nc_dict"]["gene_value"]] * weight_nc).sum())

    before = held_out_loss()
    tokenizer = GPTTokenizer(genes, 32, k)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(150):
        cells = np.sort(rng.choice(1920, 32, replace=False))
        loss = model(**tokenizer(_torch_csr(x[cells]), genes, torch.from_numpy(total_n[cells])))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    print(f"held-out gene-value loss {before:.3f} -> {after:.3f} (count-histogram guess {histogram_loss:.3f})")
    assert after < 0.7 * before
    assert after < histogram_loss - 0.1  # it learned which genes are expressed, not only the histogram


# ---------------------------------------------------------------------------------------------------------------
# The train-gpt step


@pytest.mark.ddp
def test_train_gpt_cli_on_two_cpu_processes(pbmc4k_top_genes, tmp_path: Path) -> None:
    _, genes, _ = pbmc4k_top_genes
    gene_list = tmp_path / "genes.txt"
    gene_list.write_text("\n".join(genes[:300]) + "\n")
    output = tmp_path / "gpt.ckpt"
    run_cli("train-gpt", "--input", str(PBMC4K), "--genes", str(gene_list), "--output", str(output),
            "--devices", "2", "--accelerator", "cpu", "--batch-size", "32", "--max-steps", "3",
            "--context-len", "32", "--d-model", "32", "--quiet")
    checkpoint = load_checkpoint(str(output))
    assert checkpoint["global_step"] == 3
    recipe = checkpoint[RECIPE_KEY]
    assert recipe["provenance"]["config"]["devices"] == 2
    assert recipe["model"]["init_args"]["categorical_token_size_dict"] == {"gene_id": 300, "gene_value": 128}
    module = CellariumModule.from_checkpoint(str(output))
    adata = ad.read_h5ad(PBMC4K)[:4]
    batch = {"x_ng": _torch_csr(adata.X.tocsr().astype(np.float32)), "var_names_g": np.asarray(adata.var_names),
             "total_mrna_umis_n": torch.from_numpy(np.asarray(adata.X.sum(1), dtype=np.float32).ravel())}
    with torch.no_grad():
        logits = module.predict_step(batch, 0)["gene_value"]
    assert logits.shape == (4, 32, 128) and torch.isfinite(logits).all()


def test_train_gpt_cli_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # In process: the console script's start-up (importing Lightning) is paid by the DDP test already.
    code = cli_main(["train-gpt", "--input", str(require(PBMC4K)), "--output", str(tmp_path / "gpt.ckpt"),
                     "--d-model", "30", "--n-heads", "4"])
    assert code == 2
    assert "--d-model 30 must be a multiple of --n-heads 4" in capsys.readouterr().err
    assert not (tmp_path / "gpt.ckpt").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("missing", ["gene_id", "gene_value"])
def test_vocabulary_must_name_gene_id_and_gene_value(missing: str) -> None:
    sizes = {"gene_id": N_GENES, "gene_value": GENE_VALUE_VOCAB}
    del sizes[missing]
    with pytest.raises(ValueError, match=f"must include 'gene_id' and 'gene_value'.*{missing}"):
        CellariumGPT(sizes, 32, 64, 2, 1, 0.0, True, "torch", False, {"gene_value": 1.0})


def test_bad_constructor_arguments() -> None:
    sizes = {"gene_id": N_GENES, "gene_value": GENE_VALUE_VOCAB}
    with pytest.raises(ValueError, match="no vocabulary"):
        CellariumGPT(sizes, 32, 64, 2, 1, 0.0, True, "torch", False, {"cell_type": 1.0})
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        CellariumGPT(sizes, 32, 64, 2, 1, 0.0, True, "flash", False, {"gene_value": 1.0})
    with pytest.raises(ValueError, match="divisible by n_heads"):
        CellariumGPT(sizes, 30, 64, 4, 1, 0.0, True, "torch", False, {"gene_value": 1.0})


def test_values_out_of_their_vocabulary_are_errors() -> None:
    model = small_model()
    tokens = synthetic_tokens()
    tokens["token_value_nc_dict"]["gene_id"][0, 0] = N_GENES
    with pytest.raises(ValueError, match=r"gene_id.*value 200 is out of the vocabulary range \[0, 199\]"):
        model(**tokens)
    tokens = synthetic_tokens()
    tokens["token_value_nc_dict"]["cell_type"][0, -1] = N_CELL_TYPES + 1  # past the mask token
    with pytest.raises(ValueError, match="cell_type.*out of the vocabulary range.*mask token"):
        model(**tokens)
    tokens = synthetic_tokens()
    tokens["label_nc_dict"]["gene_value"][2, 3] = GENE_VALUE_VOCAB
    with pytest.raises(ValueError, match=r"label_nc_dict\['gene_value'\].*value 16 is out of the vocabulary"):
        model(**tokens)
    tokens = synthetic_tokens()
    tokens["token_value_nc_dict"]["tissue"] = tokens["token_value_nc_dict"]["cell_type"]
    tokens["token_mask_nc_dict"]["tissue"] = tokens["token_mask_nc_dict"]["cell_type"]
    with pytest.raises(ValueError, match="unknown token types"):
        model(**tokens)


def test_a_context_longer_than_allowed_is_an_error() -> None:
    model = CellariumGPT({"gene_id": 10, "gene_value": 4}, 16, 32, 2, 1, 0.0, True, "torch", False,
                         {"gene_value": 1.0})
    n, c = 2, 11
    values = {"gene_id": torch.arange(c).remainder(10).expand(n, c), "gene_value": torch.zeros(n, c)}
    masks = {key: torch.ones(n, c, dtype=torch.bool) for key in values}
    with pytest.raises(ValueError, match="context of 11 tokens is longer than allowed: at most 10"):
        model.predict(values, masks, torch.zeros(n, c, dtype=torch.bool))
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        GPTTokenizer([f"g{i}" for i in range(10)], context_len=11, gene_value_vocab_size=4)


def test_backend_limits_are_clear_errors() -> None:
    tokens = synthetic_tokens()
    if not torch.cuda.is_available():
        model = small_model("mem_efficient")
        with pytest.raises(RuntimeError, match="'mem_efficient' has no kernel .* on cpu"):
            predict(model, tokens)
    if flex_attention_available():
        model = small_model("flex")
        model.train()
        with pytest.raises(ValueError, match="'flex' has no backward pass on cpu"):
            model(**tokens)


def test_fp32_softmax_in_half_precision_stays_close_to_float32() -> None:
    reference = small_model("torch")
    half = small_model("torch", attention_softmax_fp32=True)
    half.load_state_dict(reference.state_dict())
    half = half.to(torch.bfloat16)
    tokens = synthetic_tokens()
    expected = predict(reference, tokens)["gene_value"]
    actual = predict(half, tokens)["gene_value"]
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item() + 1e-3
