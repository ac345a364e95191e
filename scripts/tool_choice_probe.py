"""Does a demo model choose between two real functions by the question, or by a favourite verb?

The evaluation's tool cases declare 0-2 other functions, half of them made up; a model can score
well there by copying the verb of the one declaration that looks like a known task. Here every
case declares exactly two lookups of different task families with different verbs, so 50% right
is what a model that ignores the question gets.

    python scripts/tool_choice_probe.py [MODEL_FOLDER]     # default: the shipped demo model
"""

import collections
import random
import sys

from gptoss import LLM
from gptoss.demo.data import TOOLS, ConversationGenerator, family_function
from gptoss.demo.evaluate import _run

LOOKUPS = [t for t in TOOLS if t.kind not in ("convert", "timer")]  # the families whose verbs are shared


def verb(name: str) -> str:
    return name.split("_")[0]


def two_function_cases(generator: ConversationGenerator, count: int, rng: random.Random) -> list:
    cases = []
    while len(cases) < count:
        target, other = rng.sample(LOOKUPS, 2)
        case = generator.tool_case(rng, target)
        distractor = family_function(other, rng)
        if verb(distractor["function"]["name"]) == verb(case.expected["name"]):
            continue  # the same verb: nothing to choose
        declared = next(t for t in case.tools if t["function"]["name"] == case.expected["name"])
        case.tools = [declared, distractor]
        rng.shuffle(case.tools)
        cases.append(case)
    return cases


if __name__ == "__main__":
    llm = LLM(sys.argv[1] if len(sys.argv) > 1 else None)
    cases = two_function_cases(ConversationGenerator(llm.encoding, llm._text_encoding, "eval"), 300,
                               random.Random(11))
    results = _run(llm, [(c.messages, c.tools, c.reasoning_effort) for c in cases], temperature=0, max_tokens=120)
    right, chosen, by_target = 0, collections.Counter(), collections.defaultdict(list)
    for result, case in zip(results, cases):
        name = result.tool_calls[0]["function"]["name"] if result.tool_calls else ""
        ok = name == case.expected["name"]
        right += ok
        chosen[verb(name)] += 1
        by_target[verb(case.expected["name"])].append(ok)
    print(f"right function of two: {right / len(cases):.1%} of {len(cases)} (50% = not reading the question)")
    print("| verb | right when it is the target's | times written |\n|---|---|---|")
    for target_verb, right_by_case in sorted(by_target.items()):
        print(f"| {target_verb} | {sum(right_by_case) / len(right_by_case):.0%} of {len(right_by_case)} "
              f"| {chosen[target_verb]} |")
