"""Reverse-mode gradients of a loss with respect to a named set of arrays only, on autograd's tape.

`autograd.grad` differentiates with respect to ONE argument; for a nested dict, every lookup records
a container op whose backward pass allocates a zero copy of the whole tree. Here every trainable leaf
gets its own root node on one shared trace, and one backward pass collects the gradient reaching each
root. Arrays not in `trainable` (the frozen decoder) are never boxed, so autograd never computes a
gradient for them (docs/method.md §6, invariant 2). Built from the pieces of `autograd.core.make_vjp`.
"""
from autograd.core import VJPNode, add_outgrads
from autograd.tracer import isbox, new_box, toposort, trace_stack

from ..backend import xp_of


def value_and_grad(loss_fn, trainable):
    """(loss, grads, aux) of loss_fn(dict of boxed arrays) -> loss or (loss, aux dict of unboxed values).

    trainable: flat {name: array}; grads has its keys, None for a leaf the loss does not depend on
    (so that "zero gradient" and "no path" differ).
    """
    with trace_stack.new_trace() as trace_id:
        roots = {name: VJPNode.new_root() for name in trainable}
        out = loss_fn({name: new_box(a, trace_id, roots[name]) for name, a in trainable.items()})
        loss, aux = out if isinstance(out, tuple) else (out, {})
        if not (isbox(loss) and loss._trace == trace_id):
            return loss, {name: None for name in trainable}, aux
        grads = _backward(xp_of(loss._value).ones_like(loss._value), loss._node, set(roots.values()))
    return loss._value, {name: grads.get(node) for name, node in roots.items()}, aux


def _backward(g, end_node, root_nodes):
    """Propagate cotangent g from end_node; return {root node: its accumulated gradient}."""
    outgrads, found = {end_node: (g, False)}, {}
    for node in toposort(end_node):
        outgrad = outgrads.pop(node)[0]
        if node in root_nodes:
            found[node] = outgrad
            continue
        for parent, ingrad in zip(node.parents, node.vjp(outgrad)):
            outgrads[parent] = add_outgrads(outgrads.get(parent), ingrad)
    return found
