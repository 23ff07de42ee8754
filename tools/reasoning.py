"""Seeded synthetic reasoning problems, one line each, `<prompt><answer>\\n`: tasks, difficulties and the
exact-match scoring in docs/data.md. A seed fixes every line (VERSION changes whenever that output would)."""
from refimpl.errors import require

VERSION = 1
ANSWER_MARKER = " A:"
DIFFICULTIES = {"add": (2, 3, 4), "vars": (2, 3, 4), "mul": (2, 3)}
LONG_DIFFICULTIES = {"add": (3, 4), "mul": (3,)}     # answers of 3..5 digits
FEWSHOT_DIFFICULTIES = {"add": (1, 2), "mul": (1,)}    # within reach of a 135M-parameter LLM
N_SHOTS = 5
TASKS = tuple(DIFFICULTIES)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _number(n_digits, rng):
    return int(rng.integers(10 ** (n_digits - 1), 10**n_digits))


def add_problem(difficulty, rng):
    a, b = _number(difficulty, rng), _number(difficulty, rng)
    return f"Q: {a}+{b}=?", a + b


def mul_problem(difficulty, rng):
    a, b = _number(difficulty, rng), int(rng.integers(2, 10))
    return f"Q: {a}*{b}=?", a * b


def vars_problem(difficulty, rng):
    """difficulty assignments, each after the first +, - or * (by 2..4) of a random earlier variable."""
    names = [LETTERS[i] for i in rng.permutation(len(LETTERS))[:difficulty]]
    values = [int(rng.integers(1, 10))]
    parts = [f"{names[0]}={values[0]}"]
    for i in range(1, difficulty):
        src = int(rng.integers(i))
        while True:
            op = "+-*"[int(rng.integers(3))]
            const = int(rng.integers(2, 5)) if op == "*" else int(rng.integers(1, 10))
            result = {"+": values[src] + const, "-": values[src] - const, "*": values[src] * const}[op]
            if 0 <= result <= 99:
                break
        values.append(result)
        parts.append(f"{names[i]}={names[src]}{op}{const}")
    return f"Q: {' '.join(parts)}. {names[-1]}=?", values[-1]


MAKERS = {"add": add_problem, "vars": vars_problem, "mul": mul_problem}


def make_problem(task, difficulty, rng, difficulties=DIFFICULTIES):
    """One problem as a dict with task, difficulty, prompt (ending in " A:") and answer (" 623")."""
    require(task in MAKERS, f"unknown reasoning task {task!r}; use one of {TASKS}")
    require(difficulty in difficulties.get(task, ()),
            f"difficulty {difficulty} is out of range for {task!r}; use one of {difficulties.get(task, ())}")
    question, value = MAKERS[task](difficulty, rng)
    return {"task": task, "difficulty": difficulty, "prompt": question + ANSWER_MARKER, "answer": f" {value}"}


def problem_line(problem):
    """The training text of one problem: prompt, answer, newline."""
    return problem["prompt"] + problem["answer"] + "\n"


def generate(n, rng, exclude=(), tasks=TASKS, difficulties=DIFFICULTIES):
    """n problems with distinct prompts, none in `exclude`; task uniform, then difficulty uniform among
    difficulties[task]. A set `exclude` gets the new prompts: successive calls on it draw disjoint splits."""
    require(n >= 0, f"asked for {n} problems; pass a count >= 0")
    seen = exclude if isinstance(exclude, set) else set(exclude)
    problems = []
    for _ in range(100 * n + 100):
        if len(problems) == n:
            break
        task = tasks[int(rng.integers(len(tasks)))]
        difficulty = difficulties[task][int(rng.integers(len(difficulties[task])))]
        problem = make_problem(task, difficulty, rng, difficulties)
        if problem["prompt"] not in seen:
            seen.add(problem["prompt"])
            problems.append(problem)
    require(len(problems) == n, f"could only draw {len(problems)} distinct problems of {n}; ask for fewer")
    return problems


def natural_question(prompt):
    """ "Q: 3+4=? A:" -> "Question: What is 3+4?\nAnswer:" (vars: "Question: a=3 b=a+4. What is b?")."""
    body = prompt.removeprefix("Q: ").removesuffix("=?" + ANSWER_MARKER)            # "3+4", "a=3 b=a+4. b"
    given, _, asked = body.rpartition(". ")
    return f"Question: {given + '. ' if given else ''}What is {asked}?\nAnswer:"


def fewshot(problems, rng, n_shots=N_SHOTS):
    """Each problem with a few-shot prompt (n_shots others of its task and difficulty solved, then it)."""
    out = []
    for p in problems:
        shots = generate(n_shots, rng, exclude={p["prompt"]}, tasks=(p["task"],),
                         difficulties={p["task"]: (p["difficulty"],)})
        text = "".join(natural_question(s["prompt"]) + s["answer"] + "\n\n" for s in shots)
        out.append({**p, "question": p["prompt"], "prompt": text + natural_question(p["prompt"])})
    return out
