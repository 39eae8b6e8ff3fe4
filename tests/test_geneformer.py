"""Geneformer: rank-value tokenization, perturbations, predict outputs, MLM training, the train-geneformer step."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PBMC4K, require, run_cli, split_into_shards

from cellarium_steps.data import ShardDataModule
from cellarium_steps.models import Geneformer
from cellarium_steps.models.geneformer import IGNORE_INDEX, MASK_TOKEN_ID, N_SPECIAL_TOKENS, PAD_TOKEN_ID
from cellarium_steps.runner import CellariumModule
from cellarium_steps.runner.recipe import RECIPE_KEY, load_checkpoint
from cellarium_steps.steps.cli import main as cli_main

TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}


@pytest.fixture(autouse=True)
def one_thread():
    # On a shared 2-core machine, torch's worker threads spin against each other: one thread is
    # several times faster for these small models.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pbmc4k() -> ad.AnnData:
    return ad.read_h5ad(require(PBMC4K))


@pytest.fixture(scope="module")
def nonzero_median_g(pbmc4k: ad.AnnData) -> np.ndarray:
    """Each gene's median non-zero count (what the tdigest step reports); 1 for genes never seen."""
    x = pbmc4k.X.tocsc()
    median_g = np.ones(pbmc4k.n_vars)
    for g in range(pbmc4k.n_vars):
        values = x.data[x.indptr[g] : x.indptr[g + 1]]
        if len(values):
            median_g[g] = np.median(values)
    return median_g


def dense(adata: ad.AnnData, rows) -> torch.Tensor:
    return torch.from_numpy(adata.X[rows].toarray()).float()


def rank_order_by_hand(counts_g: np.ndarray, factor_g: np.ndarray) -> list[int]:
    """The cell's expressed genes by decreasing count / total / factor in exact arithmetic, ties by gene index."""
    total = Fraction(int(counts_g.sum()))
    expressed = np.flatnonzero(counts_g)
    value = {g: Fraction(int(counts_g[g])) / total / Fraction(float(factor_g[g])) for g in expressed}
    return sorted(expressed.tolist(), key=lambda g: (-value[g], g))


def tokens_by_hand(order: list[int], c: int) -> tuple[list[int], list[int]]:
    ids = [g + N_SPECIAL_TOKENS for g in order[:c]]
    mask = [1] * len(ids)
    return ids + [PAD_TOKEN_ID] * (c - len(ids)), mask + [0] * (c - len(ids))


# ---------------------------------------------------------------------------------------------------------------
# Tokenization


def test_tokenization_by_hand_on_real_cells(pbmc4k: ad.AnnData, nonzero_median_g: np.ndarray) -> None:
    n_expressed = np.diff(pbmc4k.X.indptr)
    # The cell with fewest genes (498 < 512: padded), the most (4134: truncated), and three others.
    rows = [int(np.argmin(n_expressed)), int(np.argmax(n_expressed)), 0, 1000, 2169]
    x_ng = dense(pbmc4k, rows)
    var_names_g = pbmc4k.var_names.to_numpy()
    model = Geneformer(var_names_g, max_position_embeddings=512, **TINY)
    c = 512

    # Default factor (ones): the order of the counts themselves, ties (many 1s and 2s) by gene index.
    input_ids_nc, attention_mask_nc = model.tokenize(x_ng)
    assert input_ids_nc.shape == attention_mask_nc.shape == (len(rows), c)
    for i, row in enumerate(rows):
        ids, mask = tokens_by_hand(rank_order_by_hand(x_ng[i].numpy(), np.ones(pbmc4k.n_vars)), c)
        assert input_ids_nc[i].tolist() == ids and attention_mask_nc[i].tolist() == mask, f"cell {row}"

    # With the per-gene median as factor, the order changes and still matches the hand ranking.
    model.set_norm_factor(nonzero_median_g)
    median_ids_nc, median_mask_nc = model.tokenize(x_ng)
    assert not torch.equal(median_ids_nc, input_ids_nc)
    for i, row in enumerate(rows):
        ids, mask = tokens_by_hand(rank_order_by_hand(x_ng[i].numpy(), nonzero_median_g), c)
        assert median_ids_nc[i].tolist() == ids and median_mask_nc[i].tolist() == mask, f"cell {row}"

    # Padding: the smallest cell fills its expressed genes then PADs, hidden from attention.
    assert n_expressed[rows[0]] == 498
    assert median_mask_nc[0].sum() == 498 and (median_ids_nc[0, 498:] == PAD_TOKEN_ID).all()
    assert (median_ids_nc[0, :498] >= N_SPECIAL_TOKENS).all()
    # Truncation: the others keep their 512 top-ranked genes, no PAD.
    assert median_mask_nc[1:].all() and (median_ids_nc[1:] >= N_SPECIAL_TOKENS).all()
    # Sparse CSR batches (what the data loader yields) tokenize the same.
    assert torch.equal(model.tokenize(x_ng.to_sparse_csr())[0], median_ids_nc)
    # A model shorter than the gene count truncates at max_position_embeddings exactly.
    short = Geneformer(var_names_g, max_position_embeddings=7, **TINY)
    assert torch.equal(short.tokenize(x_ng)[0], input_ids_nc[:, :7])


def test_masking_follows_bert_and_never_touches_pads() -> None:
    model = Geneformer(np.array([f"g{i}" for i in range(50)]), max_position_embeddings=40, **TINY)
    torch.manual_seed(0)
    n, c = 1000, 40
    input_ids_nc = torch.randint(N_SPECIAL_TOKENS, 52, (n, c))
    length_n = torch.randint(5, c + 1, (n,))
    attention_mask_nc = (torch.arange(c) < length_n[:, None]).long()
    input_ids_nc[attention_mask_nc == 0] = PAD_TOKEN_ID
    masked_nc, labels_nc = model.mask_tokens(input_ids_nc, attention_mask_nc)

    chosen_nc = labels_nc != IGNORE_INDEX
    assert not (chosen_nc & (attention_mask_nc == 0)).any()  # no PAD is ever chosen
    assert (masked_nc[attention_mask_nc == 0] == PAD_TOKEN_ID).all()
    assert torch.equal(labels_nc[chosen_nc], input_ids_nc[chosen_nc])
    assert torch.equal(masked_nc[~chosen_nc], input_ids_nc[~chosen_nc])  # unchosen tokens untouched
    n_real, n_chosen = int(attention_mask_nc.sum()), int(chosen_nc.sum())
    assert abs(n_chosen / n_real - 0.15) < 0.01
    became_mask = (masked_nc == MASK_TOKEN_ID) & chosen_nc
    changed_to_gene = (masked_nc != input_ids_nc) & chosen_nc & ~became_mask
    assert abs(int(became_mask.sum()) / n_chosen - 0.8) < 0.03
    # 10% random genes (a few land on their own token by chance, so count those that changed).
    assert abs(int(changed_to_gene.sum()) / n_chosen - 0.1 * 49 / 50) < 0.02
    assert (masked_nc[changed_to_gene] >= N_SPECIAL_TOKENS).all()
    assert not (masked_nc == MASK_TOKEN_ID)[~chosen_nc].any()

    # A draw that chooses nothing still gives one labelled token (so every batch has a loss).
    one_cell = model.mask_tokens(input_ids_nc[:1, :1], attention_mask_nc[:1, :1])[1]
    assert (one_cell != IGNORE_INDEX).sum() == 1
    # A batch of empty cells gives a zero loss that still reaches every parameter (DDP needs them all).
    loss = model(torch.zeros(3, 50), model.var_names_g)["loss"]
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# In silico perturbations


def test_perturbations_change_exactly_the_tokens_the_api_describes(pbmc4k: ad.AnnData) -> None:
    n_expressed = np.diff(pbmc4k.X.indptr)
    rows = [int(np.argmin(n_expressed)), 0, 1]
    x_ng = dense(pbmc4k, rows)
    x_before = x_ng.clone()
    var_names_g = pbmc4k.var_names.to_numpy()
    c = 510  # the smallest cell (498 genes) is padded, the others are truncated
    model = Geneformer(var_names_g, max_position_embeddings=c, **TINY)
    base_ids_nc, base_mask_nc = model.tokenize(x_ng)
    orders = [rank_order_by_hand(x_ng[i].numpy(), np.ones(pbmc4k.n_vars)) for i in range(len(rows))]
    def name(g: int) -> str:
        return str(var_names_g[g])

    # (2) deletion: the gene leaves and every later gene moves up one place; the next-ranked gene
    # beyond the cut (or a PAD, in the padded cell) fills the end. Deleting one cell's rank-3 gene
    # and rank-100 gene, and a gene it does not express, changes nothing else.
    deleted = [orders[1][3], orders[1][100], int(np.flatnonzero(x_ng[1].numpy() == 0)[0])]
    ids_nc, mask_nc = model.tokenize_with_perturbations(x_ng, feature_deletion=[name(g) for g in deleted])
    for i in range(len(rows)):
        kept = [g for g in orders[i] if g not in deleted]
        assert (ids_nc[i].tolist(), mask_nc[i].tolist()) == tokens_by_hand(kept, c)
    assert ids_nc[1, -2] == orders[1][c] + N_SPECIAL_TOKENS and ids_nc[1, -1] == orders[1][c + 1] + N_SPECIAL_TOKENS
    assert torch.equal(ids_nc[1, :3], base_ids_nc[1, :3]) and torch.equal(ids_nc[1, 3:99], base_ids_nc[1, 4:100])

    # (3) activation: the listed genes take the first places in list order (one of them not expressed
    # at all), the rest keep their order and shift down; the last ones fall off the end.
    unexpressed = int(np.flatnonzero(x_ng[0].numpy() == 0)[0])
    activated = [orders[0][200], unexpressed, orders[0][0]]
    ids_nc, mask_nc = model.tokenize_with_perturbations(x_ng, feature_activation=[name(g) for g in activated])
    for i in range(len(rows)):
        order = activated + [g for g in orders[i] if g not in activated]
        assert (ids_nc[i].tolist(), mask_nc[i].tolist()) == tokens_by_hand(order, c)
    assert ids_nc[:, :3].tolist() == [[g + N_SPECIAL_TOKENS for g in activated]] * len(rows)

    # (1) map: the gene's token is replaced where it stands, nothing moves. MASK keeps attention,
    # PAD is hidden from it; a gene absent from a cell changes nothing there.
    masked_gene, padded_gene = orders[1][5], orders[1][50]
    ids_nc, mask_nc = model.tokenize_with_perturbations(
        x_ng, feature_map={name(masked_gene): MASK_TOKEN_ID, name(padded_gene): PAD_TOKEN_ID}
    )
    changed = ids_nc != base_ids_nc
    for i in range(len(rows)):
        where_masked = (base_ids_nc[i] == masked_gene + N_SPECIAL_TOKENS).nonzero().flatten().tolist()
        where_padded = (base_ids_nc[i] == padded_gene + N_SPECIAL_TOKENS).nonzero().flatten().tolist()
        assert changed[i].nonzero().flatten().tolist() == sorted(where_masked + where_padded)
        assert all(ids_nc[i, p] == MASK_TOKEN_ID and mask_nc[i, p] == 1 for p in where_masked)
        assert all(ids_nc[i, p] == PAD_TOKEN_ID and mask_nc[i, p] == 0 for p in where_padded)
        assert ((mask_nc[i] != base_mask_nc[i]).nonzero().flatten().tolist()) == where_padded
    assert changed[1, 5] and changed[1, 50] and int(changed[1].sum()) == 2
    assert torch.equal(x_ng, x_before)  # perturbations work on a copy

    # The same perturbations through predict return the same tokens.
    out = model.predict(x_ng, var_names_g, output_hidden_states=False, output_attentions=False,
                        feature_deletion=[name(deleted[0])])
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].tolist()[1] == tokens_by_hand([g for g in orders[1] if g != deleted[0]], c)[0]


# ---------------------------------------------------------------------------------------------------------------
# predict


def test_predict_outputs(pbmc4k: ad.AnnData) -> None:
    # 300 genes with 300 positions, and the 6 cells expressing fewest of them: every cell is padded.
    keep = np.sort(np.argsort(-np.asarray((pbmc4k.X > 0).sum(0)).ravel(), kind="stable")[:300])
    var_names_g = pbmc4k.var_names.to_numpy()[keep]
    x_kept = pbmc4k.X[:, keep]
    rows = np.sort(np.argsort(np.diff(x_kept.indptr), kind="stable")[:6])
    x_ng = torch.from_numpy(x_kept[rows].toarray()).float()
    torch.manual_seed(0)
    model = Geneformer(var_names_g, max_position_embeddings=300, **TINY).eval()
    n, c, layers, heads, hidden = 6, 300, 2, 2, 16
    with torch.no_grad():
        out = model.predict(x_ng, var_names_g)
    assert set(out) == {"hidden_states", "attentions", "input_ids", "attention_mask"}
    assert out["hidden_states"].shape == (layers + 1, n, c, hidden)  # embeddings, then each layer
    assert out["attentions"].shape == (layers, n, heads, c, c)
    ids_nc, mask_nc = model.tokenize(x_ng)
    assert torch.equal(out["input_ids"], ids_nc) and torch.equal(out["attention_mask"], mask_nc)
    assert (mask_nc == 0).any(1).all()  # every cell has PADs here

    attentions = out["attentions"]
    torch.testing.assert_close(attentions.sum(-1), torch.ones(layers, n, heads, c))
    pad_key = (mask_nc == 0)[None, :, None, None, :].expand_as(attentions)
    assert attentions[pad_key].abs().max() < 1e-6  # no query attends to a PAD
    # The first hidden state is the embedding layer's output.
    with torch.no_grad():
        embeddings = model.bert.bert.embeddings(input_ids=ids_nc)
    torch.testing.assert_close(out["hidden_states"][0], embeddings)

    with torch.no_grad():
        fast = model.predict(x_ng, var_names_g, output_attentions=False, output_input_ids=False,
                             output_attention_mask=False)
        alone = model.predict(x_ng[2:3], var_names_g, output_attentions=False)
    assert set(fast) == {"hidden_states"}
    assert model.bert.config._attn_implementation == "sdpa"  # eager only while attentions were asked for
    real = mask_nc.bool()
    torch.testing.assert_close(fast["hidden_states"][:, real], out["hidden_states"][:, real], atol=1e-5, rtol=1e-5)
    # A cell's real tokens do not depend on the other cells of its batch.
    torch.testing.assert_close(alone["hidden_states"][:, 0][:, real[2]], fast["hidden_states"][:, 2][:, real[2]],
                               atol=1e-5, rtol=1e-5)


def test_reset_parameters_redraws_weights_and_the_factor() -> None:
    model = Geneformer(np.array([f"g{i}" for i in range(100)]), max_position_embeddings=16, **TINY)
    model.set_norm_factor(np.full(100, 3.0))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    model.reset_parameters()
    assert torch.equal(model.norm_factor_g, torch.ones(100))
    weight = model.bert.bert.embeddings.word_embeddings.weight
    assert abs(float(weight.detach().std()) - 0.02) < 0.002
    assert weight is model.bert.cls.predictions.decoder.weight  # the output layer stays tied to the input
    assert (model.bert.cls.predictions.bias == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_mlm_training_lowers_the_masked_token_loss(pbmc4k: ad.AnnData) -> None:
    """A few hundred steps on pbmc4k's 1000 most detected genes, 64 top-ranked genes per cell.

    Ranked by count (no per-gene factor): dividing by the genes' medians spreads the top ranks over
    almost all 1000 genes, a much harder task that a few hundred steps barely start on.
    """
    keep = np.sort(np.argsort(-np.asarray((pbmc4k.X > 0).sum(0)).ravel(), kind="stable")[:1000])
    var_names_g = pbmc4k.var_names.to_numpy()[keep]
    x_all = torch.from_numpy(pbmc4k.X[:, keep].toarray()).float()
    train, held_out = x_all[:1900], x_all[1900:]
    torch.manual_seed(0)
    model = Geneformer(var_names_g, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    held_ids, held_mask = model.tokenize(held_out)

    def held_out_loss() -> float:
        # The same masking draw each time, on cells never trained on.
        state = torch.get_rng_state()
        torch.manual_seed(123)
        model.eval()
        with torch.no_grad():
            loss = model.mlm_loss(held_ids, held_mask).item()
        model.train()
        torch.set_rng_state(state)
        return loss

    start = held_out_loss()
    generator = torch.Generator().manual_seed(0)
    began = time.monotonic()
    for _ in range(300):
        loss = model(train[torch.randint(len(train), (32,), generator=generator)], var_names_g)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = held_out_loss()
    print(f"masked-token loss {start:.3f} -> {end:.3f} in 300 steps, {time.monotonic() - began:.1f} s")
    assert start == pytest.approx(np.log(len(var_names_g) + 2), rel=0.05)  # uniform guess at the start
    assert end < 0.8 * start


# ---------------------------------------------------------------------------------------------------------------
# cellarium-steps train-geneformer


@pytest.mark.ddp
def test_train_geneformer_cli_ddp_two_processes(
    pbmc4k: ad.AnnData, nonzero_median_g: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = split_into_shards(pbmc4k, tmp_path / "shards", 2)
    keep = np.sort(np.argsort(-np.asarray((pbmc4k.X > 0).sum(0)).ravel(), kind="stable")[:500])
    genes = pbmc4k.var_names.to_numpy()[keep]
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
    # The tdigest step's table: every gene, NaN median for the genes never expressed.
    n_nonzero = np.asarray((pbmc4k.X > 0).sum(0)).ravel()
    pd.DataFrame({
        "gene": pbmc4k.var_names, "n_nonzero": n_nonzero,
        "median": np.where(n_nonzero > 0, nonzero_median_g, np.nan),
    }).to_csv(tmp_path / "tdigest.csv", index=False)
    output = tmp_path / "gf" / "geneformer.ckpt"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_cli("train-geneformer", "--input", *shards, "--output", str(output), "--genes", str(tmp_path / "genes.txt"),
            "--tdigest", str(tmp_path / "tdigest.csv"), "--devices", "2", "--accelerator", "cpu",
            "--batch-size", "64", "--hidden-size", "16", "--intermediate-size", "32",
            "--max-position-embeddings", "32", "--max-epochs", "1", "--quiet")

    checkpoint = load_checkpoint(str(output))
    dataset = ShardDataModule(shards, batch_size=64).dataset
    dataset.set_distributed(0, 2)
    assert checkpoint["global_step"] == len(dataset)  # each of the 2 ranks took half of the epoch's batches
    recipe = checkpoint[RECIPE_KEY]
    assert recipe["model"]["class_path"] == "cellarium_steps.models.geneformer.Geneformer"
    assert recipe["model"]["init_args"]["max_position_embeddings"] == 32
    np.testing.assert_allclose(checkpoint["state_dict"]["model.norm_factor_g"].numpy(), nonzero_median_g[keep])

    module = CellariumModule.from_checkpoint(str(output))
    batch = {"x_ng": dense(pbmc4k, slice(0, 3)).to_sparse_csr(), "var_names_g": pbmc4k.var_names.to_numpy()}
    with torch.no_grad():
        out = module.predict_step(batch, 0)
    assert out["hidden_states"].shape == (3, 3, 32, 16) and out["attentions"].shape == (2, 3, 2, 32, 32)


def test_train_geneformer_rejects_a_bad_tdigest_table(pbmc4k: ad.AnnData, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    pd.DataFrame({"gene": pbmc4k.var_names[:10], "median": 1.0}).to_csv(tmp_path / "short.csv", index=False)
    pd.DataFrame({"gene": pbmc4k.var_names, "q50": 1.0}).to_csv(tmp_path / "nomedian.csv", index=False)
    for table, message in (("short.csv", "of the model's genes are not in the table"), ("nomedian.csv", "'median'")):
        code = cli_main(["train-geneformer", "--input", str(PBMC4K), "--output", str(tmp_path / "m.ckpt"),
                         "--tdigest", str(tmp_path / table), "--accelerator", "cpu"])
        assert code == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors(pbmc4k: ad.AnnData) -> None:
    var_names_g = pbmc4k.var_names.to_numpy()[:200]
    x_ng = torch.from_numpy(pbmc4k.X[:4][:, :200].toarray()).float()
    model = Geneformer(var_names_g, max_position_embeddings=16, **TINY)

    with pytest.raises(ValueError, match="var_names_g of the input"):
        model(x_ng, var_names_g[::-1])
    with pytest.raises(ValueError, match="var_names_g of the input"):
        model.predict(x_ng[:, :199], var_names_g[:199])
    with pytest.raises(ValueError, match=r"x_ng has shape \(4, 199\)"):
        model.tokenize(x_ng[:, :199])
    with pytest.raises(ValueError, match="negative"):
        model(-x_ng, var_names_g)
    # Sequences longer than the model allows.
    with pytest.raises(ValueError, match="longer than max_position_embeddings=16"):
        model.encode(torch.full((2, 17), 5), torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence would be too long"):
        model.predict(x_ng, var_names_g, feature_activation=list(var_names_g[:17]))
    with pytest.raises(ValueError, match="token ids must be in"):
        model.encode(torch.full((2, 4), 202), torch.ones(2, 4, dtype=torch.long))
    # Perturbations naming unknown genes or tokens.
    with pytest.raises(ValueError, match="feature_deletion: 1 genes are not in"):
        model.predict(x_ng, var_names_g, feature_deletion=["NOT_A_GENE"])
    with pytest.raises(ValueError, match="feature_map tokens must be in"):
        model.predict(x_ng, var_names_g, feature_map={str(var_names_g[0]): 10_000})
    with pytest.raises(ValueError, match="both activated and deleted"):
        model.predict(x_ng, var_names_g, feature_activation=[str(var_names_g[0])],
                      feature_deletion=[str(var_names_g[0])])
    with pytest.raises(TypeError, match="list of gene names"):
        model.predict(x_ng, var_names_g, feature_activation=str(var_names_g[0]))
    # Constructor and factor.
    with pytest.raises(ValueError, match="relative position embeddings"):
        Geneformer(var_names_g, position_embedding_type="relative_key", **TINY)
    with pytest.raises(ValueError, match="mlm_probability"):
        Geneformer(var_names_g, mlm_probability=0.0, **TINY)
    with pytest.raises(ValueError, match="positive and finite"):
        model.set_norm_factor(np.zeros(200))
    with pytest.raises(ValueError, match=r"expected \(200,\)"):
        model.set_norm_factor(np.ones(199))
