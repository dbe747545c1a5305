"Crossword generator and metrics: invariants over many seeds and sizes, metrics against cell-by-cell brute force."
import random
import pytest
from hypothesis import given, settings, strategies as st
from posttrain_nb.infer.crossword import (make_puzzle, load_words, score, prefill, leave_one_out, to_text, parse_text,
                                          Puzzle, Entry, ACROSS, DOWN)

WORDS = load_words()

def _runs(grid):
    "Maximal runs of >= 2 letters, read straight off the grid."
    out, R, C = {}, len(grid), len(grid[0])
    for d, (dr, dc) in ((ACROSS, (0, 1)), (DOWN, (1, 0))):
        for r in range(R):
            for c in range(C):
                if grid[r][c] == "-" or (r - dr >= 0 and c - dc >= 0 and grid[r - dr][c - dc] != "-"): continue
                s, y, x = "", r, c
                while y < R and x < C and grid[y][x] != "-": s += grid[y][x]; y += dr; x += dc
                if len(s) >= 2: out[(r, c, d)] = s
    return out

@settings(max_examples=40, deadline=None)
@given(size=st.integers(5, 12), seed=st.integers(0, 10**6))
def test_placer_invariants(size, seed):
    p = make_puzzle(WORDS, size, size + 1, seed=seed, attempts=3)
    g = p.grid
    assert len(g) == size and all(len(r) == size + 1 for r in g)
    # the grid's letter runs are exactly the placed words: no unclued word, no word hidden inside another
    assert _runs(g) == {(e.row, e.col, e.direction): e.word for e in p.entries}
    assert all(len(e.word) <= size - 2 for e in p.entries)
    # numbering: start cells numbered 1.. in reading order, shared by an across and a down word starting together
    starts = sorted({(e.row, e.col) for e in p.entries})
    assert {(e.row, e.col): e.number for e in p.entries} == {rc: i + 1 for i, rc in enumerate(starts)}
    # connected word graph through the crossings
    adj = {e.key: set() for e in p.entries}
    for a, i, d, j, (r, c) in p.intersections:
        assert p.answers[a][i] == p.answers[d][j] == g[r][c]
        adj[a].add(d); adj[d].add(a)
    seen, todo = set(), [p.entries[0].key]
    while todo:
        k = todo.pop()
        if k not in seen: seen.add(k); todo += adj[k]
    assert seen == set(adj)

def test_same_seed_same_puzzle_in_a_new_process():
    import subprocess, sys
    code = "from posttrain_nb.infer.crossword import make_puzzle; print(make_puzzle('words_en', 7, 7, seed=5).grid)"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(outs) == 1 and outs.pop().strip() == str(make_puzzle("words_en", 7, 7, seed=5).grid)

def test_target_error_names_grid_and_list():
    with pytest.raises(RuntimeError, match=r"6x6 grid from word list 'words_en'.*time_budget"):
        make_puzzle("words_en", 6, 6, target=60, time_budget=0.3)

def _brute_icr(p, pred):
    by_cell = {}
    for e in p.entries:
        w = pred.get(e.key, "").lower()
        for i, rc in enumerate(e.cells): by_cell.setdefault(rc, []).append(w[i] if i < len(w) else None)
    crossed = [v for v in by_cell.values() if len(v) == 2]
    return sum(a is not None and a == b for a, b in crossed) / len(crossed)

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), drop=st.floats(0, 0.5))
def test_metrics_against_brute_force(seed, drop):
    p = make_puzzle(WORDS, 7, 7, seed=seed % 50, attempts=3)
    rng = random.Random(seed)
    pred = {}
    for k, w in p.answers.items():
        if rng.random() < drop: continue
        n = len(w) + rng.choice([-1, 0, 0, 1])
        pred[k] = "".join(rng.choice(w + "XY") for _ in range(max(n, 0)))
    s = score(p, pred)
    gold = p.answers
    exact = sum(pred.get(k, "").lower() == w.lower() for k, w in gold.items())
    assert s["wcr"] == pytest.approx(exact / len(gold))
    num = den = 0
    for k, w in gold.items():
        q = pred.get(k, "").lower(); w = w.lower()
        num += sum(1 for i in range(min(len(w), len(q))) if w[i] == q[i]); den += max(len(w), len(q))
    assert s["lcr"] == pytest.approx(num / den)
    if pred: assert s["icr"] == pytest.approx(_brute_icr(p, pred))
    assert s["complete"] == (exact == len(gold) and set(pred) == set(gold))

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_consistent_relabelling_has_full_icr(seed):
    "Any letter permutation applied to the whole grid keeps every crossing consistent."
    p = make_puzzle(WORDS, 8, 8, seed=seed % 50, attempts=3)
    letters = [chr(65 + i) for i in range(26)]
    perm = dict(zip(letters, random.Random(seed).sample(letters, 26)))
    wrong = {k: "".join(perm[ch] for ch in w) for k, w in p.answers.items()}
    s = score(p, wrong)
    assert s["icr"] == 1.0
    assert s["wcr"] == sum(wrong[k] == w for k, w in p.answers.items()) / len(p.answers)

def test_lcr_closed_forms():
    one = Puzzle(3, 6, [Entry("CAT", "pet", 0, 0, ACROSS, 1)], "t")
    assert score(one, {"across 1": "CAR"})["lcr"] == pytest.approx(2 / 3)
    assert score(one, {"across 1": "CATS"})["lcr"] == pytest.approx(3 / 4)
    assert score(one, {"across 1": {"answer": " 'cat' "}})["wcr"] == 1.0

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), ratio=st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_prefill_and_text_round_trip(seed, ratio):
    p = make_puzzle(WORDS, 9, 9, seed=seed % 30, attempts=3)
    shown = prefill(p, ratio, seed)
    assert all(any(rc not in shown for rc in e.cells) for e in p.entries)
    back = parse_text(to_text(p, shown))
    assert [[int(v != 1) for v in row] for row in back["grid"]] == [[int(ch != "-") for ch in row] for row in p.grid]
    assert back["revealed"] == shown
    key, loo = leave_one_out(p, seed)
    assert set(loo).isdisjoint(p.entry(key).cells)

# --- the tiny-model solver's text interface -------------------------------------------------------------------------
from posttrain_nb.infer.crossword import (solver_tokenizer, solver_prompt, answer_text, parse_answers, solver_model,
                                          model_solve, train_solver)

TOK = solver_tokenizer()

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(5, 11), ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75]))
def test_solver_text_round_trips_through_the_tokenizer(seed, size, ratio):
    p = make_puzzle(WORDS, size, size, seed=seed % 100, attempts=2)
    rng = random.Random(seed)
    pred = {k: "".join(rng.choice("ABCXYZ") for _ in range(rng.randint(1, 8))) for k in p.answers if rng.random() < 0.8}
    ids = TOK(answer_text(p, pred))["input_ids"]
    assert TOK.unk_token_id not in ids
    assert parse_answers(TOK.decode(ids)) == pred
    # the prompt's first tokens are the grid, one token per cell: 1 blocked, 0 empty, or the revealed letter
    shown = prefill(p, ratio, seed)
    toks = TOK.convert_ids_to_tokens(TOK(solver_prompt(p, shown))["input_ids"])
    assert TOK.unk_token not in toks
    cells = ["1" if p.grid[r][c] == "-" else shown.get((r, c), "0") for r in range(size) for c in range(size)]
    assert toks[0] == "Grid" and toks[1:1 + size * size] == cells and toks[1 + size * size] == "Across"

def test_parse_answers_is_forgiving_but_exact():
    assert parse_answers("Answers: across 1 = C A T ; down 12 = D O G ;") == {"across 1": "CAT", "down 12": "DOG"}
    assert parse_answers("across 1 = C A T ; across 1 = B A T ; down 2 = D O G7 ; down 3 =") == {"across 1": "CAT", "down 3": ""}
    assert parse_answers(None) == {} and parse_answers("across = C A T") == {}

def test_model_solve_on_an_untrained_model_returns_parsed_dicts():
    ps = [make_puzzle(WORDS, 5, 5, seed=s, attempts=2) for s in range(2)]
    outs = model_solve(solver_model(TOK, hidden=32, layers=1), TOK, ps, [prefill(p, 0.5, 0) for p in ps])
    assert len(outs) == 2 and all(isinstance(o, dict) for o in outs)
    assert all(0 <= score(p, o)["wcr"] <= 1 for p, o in zip(ps, outs))
    with pytest.raises(ValueError, match="no training puzzles"): train_solver(solver_model(TOK, hidden=32, layers=1), TOK, [])
    with pytest.raises(ValueError, match="2 puzzles but 1 prefills"): model_solve(solver_model(TOK, hidden=32, layers=1), TOK, ps, [{}])
    with pytest.raises(ValueError, match="no puzzles"): model_solve(solver_model(TOK, hidden=32, layers=1), TOK, [])
