"""Reverse-mode gradients with respect to a named set of arrays only, on autograd's tape: each trainable
leaf gets its own root node on one shared trace (`autograd.grad` of a nested dict would copy the whole tree
per lookup); the frozen decoder is never boxed, so autograd never computes its gradient (docs/method.md §6,
invariant 2)."""
from autograd.core import VJPNode, add_outgrads
from autograd.tracer import isbox, new_box, toposort, trace_stack

from ..backend import xp_of


def value_and_grad(loss_fn, trainable):
    """(loss, grads, aux) of loss_fn(boxed trainable) -> loss or (loss, aux dict of unboxed values).
    trainable: flat {name: array}; grads[name] is None where the loss does not depend on it."""
    with trace_stack.new_trace() as trace_id:
        roots = {name: VJPNode.new_root() for name in trainable}
        out = loss_fn({name: new_box(a, trace_id, roots[name]) for name, a in trainable.items()})
        loss, aux = out if isinstance(out, tuple) else (out, {})
        if not (isbox(loss) and loss._trace == trace_id):
            return loss, {name: None for name in trainable}, aux
        # autograd.core.backward_pass, collecting the gradient that reaches each root
        root_nodes, grads = set(roots.values()), {}
        outgrads = {loss._node: (xp_of(loss._value).ones_like(loss._value), False)}
        for node in toposort(loss._node):
            outgrad = outgrads.pop(node)[0]
            if node in root_nodes:
                grads[node] = outgrad
                continue
            for parent, ingrad in zip(node.parents, node.vjp(outgrad)):
                outgrads[parent] = add_outgrads(outgrads.get(parent), ingrad)
    return loss._value, {name: grads.get(node) for name, node in roots.items()}, aux
