"""Reverse-mode gradients of a loss with respect to a named set of arrays, on autograd's tape.

`autograd.grad` differentiates with respect to ONE argument; when that argument is a nested
dict, every `params[name]` lookup records a container op whose backward pass allocates a zero
copy of the whole tree. Here instead every trainable leaf gets its own root node on one shared
trace, the loss function receives a plain dict of boxed leaves, and one backward pass collects
the gradient that reaches each root. Arrays that are not in `trainable` (the frozen decoder)
are never boxed, so autograd never computes a gradient for them (docs/method.md §6, invariant 2).

This uses autograd's tracer API (`trace_stack`, `new_box`, `VJPNode`, `toposort`,
`add_outgrads`), the same pieces `autograd.core.make_vjp` is built from.
"""
from autograd.core import VJPNode, add_outgrads
from autograd.tracer import isbox, new_box, toposort, trace_stack

from ..backend import xp_of


def value_and_grad(loss_fn, trainable):
    """loss_fn(dict of boxed arrays) -> scalar. Returns (loss, grads, aux).

    trainable: flat dict {name: array}. grads: same keys; a leaf the loss does not depend on
    gets None (so a test can tell "zero gradient" from "no path"). loss_fn may return
    (loss, aux) where aux is a dict of unboxed diagnostics (latent norms etc.).
    """
    with trace_stack.new_trace() as trace_id:
        roots = {name: VJPNode.new_root() for name in trainable}
        boxed = {name: new_box(a, trace_id, roots[name]) for name, a in trainable.items()}
        out = loss_fn(boxed)
        loss, aux = out if isinstance(out, tuple) else (out, {})
        if not (isbox(loss) and loss._trace == trace_id):
            return loss, {name: None for name in trainable}, aux
        xp = xp_of(loss._value)
        grads = _backward(xp.ones_like(loss._value), loss._node, set(roots.values()))
    return loss._value, {name: grads.get(node) for name, node in roots.items()}, aux


def _backward(g, end_node, root_nodes):
    """Propagate cotangent g from end_node; return {root node: its accumulated gradient}."""
    outgrads = {end_node: (g, False)}
    found = {}
    for node in toposort(end_node):
        outgrad = outgrads.pop(node)[0]
        if node in root_nodes:
            found[node] = outgrad
            continue
        for parent, ingrad in zip(node.parents, node.vjp(outgrad)):
            outgrads[parent] = add_outgrads(outgrads.get(parent), ingrad)
    return found
