"""What a malicious server can carry of an image to the first linear layer of a model it did not design (one module
over 450 lines: the path, the carrying, the probe and the readout are one chain whose steps share their types).

A client that loads the server's weights with `load_state_dict(strict=True)` into its own `nn.Module` lets the
server choose parameter VALUES only. This module finds, for any such model, the path an image takes to its
first linear layer, sets the convolutions on that path to carry the image, and measures what arrives:

- `image_path`: the first linear layer's name, whether a ReLU follows it, and the steps before it
  (convolutions, ReLUs, max-pools, flattening), read by torch.fx, or, for a model fx cannot trace, by forward
  hooks on its modules (which see no functional ReLU). A path the carrying cannot cross raises ValueError in
  one line naming the layer that stops it and why: a batch norm (training normalises by the batch), an
  average pool, a non-ReLU activation, dropout, two branches joined, no ReLU after the linear layer.
- `carry_convs`: every convolution on the path copies one input channel at one kernel tap (a one-hot kernel),
  with a bias that keeps its output non-negative, so the ReLUs pass it and each max-pool keeps the largest
  carried value of its window. Convolutions before the last carry each live channel once, at the centre tap;
  the last one tiles its input with shifted copies (channel by channel: every colour of a tile first), so that
  its output grid, after the pools, covers as much of the input as its kernel can reach; channels left over
  take further taps (overlapping blocks, which narrow down each pixel).
- `probe`: the linear layer's input measured on images (in [0, 1], through the model's own forward and its
  forward pre-hooks, e.g. an input normalization): which pixels reach each input feature (one-pixel probes),
  its scale and offset, and a check on random images that each feature is exactly offset + scale x (the
  largest pixel of its region); features that are not are left out. A linear-first model gives every pixel
  exactly (regions of one pixel); the quickstart's Net (two 5 x 5 convolutions, two 2 x 2 max-pools, 400
  inputs to fc1) gives the largest pixel of 4 x 4 blocks of one colour.
- `CarriedReadout`: a row of the linear layer fired by one image alone has weight change g f and bias change
  g, so f = dW / db exactly; the readout maps f back to carried values (offset and scale inverted), drops
  the candidates that are mixtures of others (`unmixed`), and maps each to an image: exact where every pixel
  arrives alone; otherwise by a linear decoder (`fit_decoder`: ridge regression fitted on the server's own
  public images, for the Net +2.4 dB over the plain reading), or, without one, each pixel the least
  maximum of the regions holding it, pixels no region holds copied from the nearest held one.

Pure torch: no Flower, no ground truth.
"""
import operator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize
from torch import fx, nn

from .analytic import CONFIRMED, UNCONFIRMED, Readout, _finish, _plausible, _same

ProbeBatch = 256  # one-pixel probe images per forward pass
MIXTURE_RESIDUAL = 1e-4  # a candidate this close (relative) to a mixture of the others is one
NEAR_COPY = 0.05  # relative distance: two images of a data set are never this alike
MIXTURE_LARGEST = 0.9  # ... whose weights are all under this, where it was measured before the images it mixes
RIDGE_PENALTIES = (0.1, 1.0, 10.0, 100.0)  # the decoder's candidate penalties
AFFINE_TOLERANCE = 1e-4  # a feature's largest error against offset + scale x max, over its scale


@dataclass(frozen=True)
class Step:
    """One step of the image's path to the linear layer: its name (module or fx node), what it is
    ("conv", "relu", "maxpool", "flatten") and, for a module, the module; `stride`: a max-pool's."""

    name: str
    kind: str
    module: nn.Module | None = None
    stride: int = 1


@dataclass(frozen=True)
class ImagePath:
    """The path an image takes to a model's first linear layer.

    Parameters
    ----------
    layer : str
        The first linear layer's module name.
    relu : bool
        Whether a ReLU follows it (the trap and qbi need one: it is what switches rows off).
    steps : tuple[Step, ...]
        What the image passes before it, in order.
    traced : bool
        Read by torch.fx (True) or by forward hooks (False: functional ops were not seen).
    """

    layer: str
    relu: bool
    steps: tuple[Step, ...]
    traced: bool = True

    @property
    def convs(self) -> list[str]:
        return [step.name for step in self.steps if step.kind == "conv"]


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_POOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d}
_FLATTEN_FUNCTIONS = {torch.flatten}
_AVERAGE = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool1d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _refusal(name: str, what: str, layer: str, why: str) -> ValueError:
    return ValueError(f"{name} ({what}) stops the image before {layer}: {why}")


def _module_step(name: str, module: nn.Module, layer: str) -> Step | None:
    """The step a module is, None for one that changes nothing (Identity); a refusal for one the carrying cannot
    cross."""
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1):
            raise _refusal(name, kind, layer, "a grouped or dilated convolution; the carrying sets plain ones only")
        return Step(name, "conv", module)
    if isinstance(module, nn.ReLU):
        return Step(name, "relu", module)
    if isinstance(module, nn.MaxPool2d):
        stride = module.stride if isinstance(module.stride, int) else module.stride[0]
        return Step(name, "maxpool", module, int(stride))
    if isinstance(module, nn.Flatten):
        return Step(name, "flatten", module)
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, _AVERAGE):
        size = getattr(module, "output_size", None)
        if size in (1, (1, 1)):
            raise _refusal(name, kind, layer, "it averages each channel over the whole image, so one value per "
                                              "channel reaches the linear layer and no parameter value undoes it")
        raise _refusal(name, kind, layer, "it averages neighbouring values; the carrying reads maxima of regions "
                                          "and sets no average apart")
    if isinstance(module, _NORMS):
        raise _refusal(name, kind, layer, "in training it normalises by the batch's own statistics, so what reaches "
                                          "the linear layer depends on the other images and no parameter value "
                                          "undoes it")
    if isinstance(module, nn.Dropout | nn.Dropout2d):
        raise _refusal(name, kind, layer, "in training it zeroes random values of each image before they arrive")
    raise _refusal(name, kind, layer, "the carrying crosses only convolutions, ReLUs, max-pools and flattening")


def image_path(model: nn.Module, image_shape: tuple[int, int, int]) -> ImagePath:
    """The path an image takes to `model`'s first linear layer (module docstring).

    Parameters
    ----------
    model : nn.Module
        The client's architecture (any values).
    image_shape : tuple[int, int, int]
        (C, H, W) of one image, for the hook fallback's forward pass.

    Returns
    -------
    ImagePath
        Raises ValueError (one line naming the layer that stops the image, and why) for a path the carrying
        cannot cross.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # a model fx cannot trace (data-dependent control flow): read it by hooks
        path = _hooked_path(model, image_shape, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
    else:
        path = _traced_path(model, graph)
    if getattr(model.get_submodule(path.layer), "bias", None) is None:
        raise ValueError(f"{path.layer} (Linear) has no bias: a row's bias change is what divides its weight change "
                         "into the image")
    entering = layer_input(model, path.layer, torch.zeros(2, *image_shape))
    if entering.ndim != 2:
        raise ValueError(f"{path.layer} (Linear) receives each image as a {tuple(entering.shape[1:])} tensor, not "
                         "one flat vector, so each of its rows sees only part of the image")
    return path


def _traced_path(model: nn.Module, graph: fx.Graph) -> ImagePath:
    modules = dict(model.named_modules())
    linear = next((target for node in graph.nodes if node.op == "call_module"
                   and isinstance(modules[target := str(node.target)], nn.Linear)), None)
    layer = linear or "any linear layer"
    carried: set[fx.Node] = set()
    steps: list[Step] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if not carried:
                carried.add(node)
            continue
        sources = [each for each in node.all_input_nodes if each in carried]
        if not sources or node.op == "output":
            continue
        if len(sources) > 1:
            raise _refusal(node.name, str(node.target), layer, "it joins two branches of the image")
        if node.op == "call_module":
            module = modules[str(node.target)]
            if isinstance(module, nn.Linear):
                relu = any(_is_relu(user, modules) for user in node.users)
                if not relu:
                    raise ValueError(f"{node.target} (Linear), the first linear layer, has no ReLU after it: every "
                                     "image's gradient reaches every row, so no row holds one image alone")
                return ImagePath(str(node.target), relu, tuple(steps))
            step = _module_step(str(node.target), module, layer)
        elif node.op == "call_method" and node.target in ("size", "dim", "shape"):
            continue  # a shape read: carries no image
        else:
            step = _function_step(node, layer)
        if step is not None:
            steps.append(step)
        carried.add(node)
    raise ValueError(f"{type(model).__name__} has no linear layer that the image reaches; the trap and qbi rewrite "
                     "rows of one")


def _function_step(node: fx.Node, layer: str) -> Step | None:
    target = node.target
    if node.op == "call_function" and target in _RELU_FUNCTIONS or node.op == "call_method" and target in (
            "relu", "relu_"):
        return Step(node.name, "relu")
    if node.op == "call_function" and target in _POOL_FUNCTIONS:
        kernel = node.kwargs.get("kernel_size", node.args[1] if len(node.args) > 1 else None)
        stride = node.kwargs.get("stride", node.args[2] if len(node.args) > 2 else None) or kernel
        stride = stride if isinstance(stride, int) else stride[0]  # type: ignore[index]
        return Step(node.name, "maxpool", stride=int(stride))  # type: ignore[arg-type]
    if node.op == "call_function" and target in _FLATTEN_FUNCTIONS or node.op == "call_method" and target in (
            "view", "reshape", "flatten"):
        return Step(node.name, "flatten")
    if node.op == "call_method" and target in ("contiguous", "float"):
        return None
    what = getattr(target, "__name__", str(target))
    if target in (F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean):
        raise _refusal(node.name, what, layer, "it averages values of the image; the carrying reads maxima of "
                                               "regions and sets no average apart")
    if target in (operator.add, torch.add, torch.cat, operator.mul):
        raise _refusal(node.name, what, layer, "it combines the image with something else on its way")
    raise _refusal(node.name, what, layer, "the carrying crosses only convolutions, ReLUs, max-pools and flattening")


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.ReLU)
    return node.op == "call_function" and node.target in _RELU_FUNCTIONS or node.op == "call_method" and \
        node.target in ("relu", "relu_")


def _hooked_path(model: nn.Module, image_shape: tuple[int, int, int], why: str) -> ImagePath:
    """The path as the model's leaf modules are called on two images (functional ops are not seen)."""
    order: list[str] = []
    handles = [module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name))
               for name, module in model.named_modules() if not list(module.children())]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros(2, *image_shape))
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    linear = next((name for name in order if isinstance(modules[name], nn.Linear)), None)
    if linear is None:
        raise ValueError(f"{type(model).__name__} calls no linear layer (it could not be traced: {why})")
    at = order.index(linear)
    steps = [step for name in order[:at] if (step := _module_step(name, modules[name], linear)) is not None]
    after = order[at + 1] if at + 1 < len(order) else None
    if after is None or not isinstance(modules[after], nn.ReLU):
        raise ValueError(f"{linear} (Linear): no ReLU module follows it, and the model could not be traced to see "
                         f"a functional one ({why})")
    return ImagePath(linear, True, tuple(steps), traced=False)


def layer_input(model: nn.Module, name: str, images: torch.Tensor, output: bool = False) -> torch.Tensor:
    """The input (or output) of module `name` when `model` runs `images` (its forward pre-hooks included)."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], result: torch.Tensor) -> None:
        seen.append((result if output else inputs[0]).detach())

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(images)
    finally:
        handle.remove()
    return seen[0]


def _taps(kernel: tuple[int, int], extent: tuple[int, int], covered: tuple[int, int]) -> list[tuple[int, int]]:
    """The last convolution's taps: first the shifts that tile its input (one output grid covers `covered`
    of `extent` input cells), then every other tap, centre first."""
    axes = []
    for k, e, c in zip(kernel, extent, covered, strict=True):
        limit = min(k - 1, max(0, e - c))
        shifts = sorted({min(i * c, limit) for i in range(e // max(c, 1) + 2)})
        axes.append(shifts)
    tiles = [(y, x) for y in axes[0] for x in axes[1]]
    rest = sorted(((y, x) for y in range(kernel[0]) for x in range(kernel[1]) if (y, x) not in tiles),
                  key=lambda t: (abs(t[0] - kernel[0] // 2) + abs(t[1] - kernel[1] // 2), t))
    return tiles + rest


def carry_convs(model: nn.Module, path: ImagePath, image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """The values of the path's convolutions (weights and biases) that carry the image (module docstring).
    `model` is left holding them.

    Parameters
    ----------
    model : nn.Module
        The attack's copy of the client's model (forward pre-hooks such as an input normalization included).
    path : ImagePath
        Its path (`image_path`).
    image_shape : tuple[int, int, int]
        (C, H, W) of one image in [0, 1].

    Returns
    -------
    dict[str, torch.Tensor]
        State-dict entries: each convolution's weight and bias.
    """
    values: dict[str, torch.Tensor] = {}
    live = list(range(image_shape[0]))
    convs = path.convs
    zeros = torch.zeros(1, *image_shape)
    for index, name in enumerate(convs):
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        kernel = (int(conv.kernel_size[0]), int(conv.kernel_size[1]))
        entering = layer_input(model, name, zeros)  # what enters it, black image: its carried values' least
        if index < len(convs) - 1:
            taps = [(kernel[0] // 2, kernel[1] // 2)]
        else:
            out = layer_input(model, name, zeros, output=True)
            after = [step for step in path.steps[[s.name for s in path.steps].index(name) + 1:]]
            pooled = 1
            for step in after:
                pooled *= step.stride if step.kind == "maxpool" else 1
            stride = int(conv.stride[0])
            covered = tuple((size // pooled) * pooled * stride for size in out.shape[2:])
            taps = _taps(kernel, (int(entering.shape[2]), int(entering.shape[3])),
                         (int(covered[0]), int(covered[1])))
        plan = [(channel, tap) for tap in taps for channel in live][: conv.out_channels]
        weight = torch.zeros_like(conv.weight)
        bias = torch.zeros(conv.out_channels)
        least = entering[0].flatten(1).min(1).values  # per input channel
        for j, (channel, (ty, tx)) in enumerate(plan):
            weight[j, channel, ty, tx] = 1.0
            bias[j] = -float(least[channel])
        values[f"{name}.weight"] = weight
        with torch.no_grad():
            conv.weight.copy_(weight)
            if conv.bias is not None:
                conv.bias.copy_(bias)
                values[f"{name}.bias"] = bias.clone()
        live = list(range(len(plan)))
    return values


@dataclass(frozen=True)
class Carried:
    """What of an image reaches the linear layer: feature `features[i]` is offset[i] + scale[i] x (the largest
    pixel of regions[i]) for every image in [0, 1].

    Parameters
    ----------
    features : torch.Tensor
        (L,) the live input features of the layer.
    scale, offset : torch.Tensor
        (L,) each one's affine map from its carried value.
    regions : torch.Tensor
        (L, C*H*W) bool: the pixels each one reaches.
    fill : torch.Tensor
        (C*H*W,) for each pixel, the pixel whose estimate it takes (itself when a region holds it).
    image_shape : tuple[int, int, int]
    description : str
        What survives, in one sentence.
    decoder : torch.Tensor, optional
        (L + 1, C*H*W) a linear map from the carried values (and 1) to the image, fitted on the server's own
        images (`fit_decoder`); without it, the least maximum of the regions holding each pixel.
    """

    features: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    regions: torch.Tensor
    fill: torch.Tensor
    image_shape: tuple[int, int, int]
    description: str
    decoder: torch.Tensor | None = None

    def values(self, inputs: torch.Tensor) -> torch.Tensor:
        """The carried values (N, L) of layer inputs (N, features)."""
        return (inputs[:, self.features].double() - self.offset.double()) / self.scale.double()

    def image(self, values: torch.Tensor) -> torch.Tensor:
        """An image (C, H, W) from carried values (L,): each pixel the least maximum of the regions holding it,
        the pixels none holds copied from the nearest held one; or by the fitted decoder, if there is one."""
        if self.decoder is not None:
            ones = torch.ones(1, dtype=torch.float64)
            return (torch.cat([values.double(), ones]) @ self.decoder).clamp(0, 1).reshape(self.image_shape)
        feature, pixel = self.regions.nonzero(as_tuple=True)
        least = torch.full((self.regions.shape[1],), float("inf"), dtype=torch.float64)
        least = least.scatter_reduce(0, pixel, values.double()[feature], reduce="amin")
        return least[self.fill].reshape(self.image_shape)

    @property
    def exact(self) -> bool:
        """Every pixel arrives alone: the image is read exactly."""
        return bool((self.regions.sum(1) == 1).all() and self.regions.any(0).all())


def fit_decoder(carried: Carried, values: torch.Tensor, images: torch.Tensor) -> Carried:
    """`carried` with a decoder: ridge regression of the pixels of `images` (the server's own, in [0, 1]) on
    their carried `values` (N, L), its penalty chosen on a held-out quarter of them; unchanged when every
    pixel is carried exactly (nothing to learn).

    Parameters
    ----------
    carried : Carried
        What reaches the layer.
    values : torch.Tensor
        (N, L) the carried values of `images`.
    images : torch.Tensor
        (N, C, H, W) in [0, 1].

    Returns
    -------
    Carried
        With `decoder` set, and the description saying so.
    """
    if carried.exact or len(images) < 8:
        return carried
    design = torch.cat([values.double(), torch.ones(len(values), 1, dtype=torch.float64)], 1)
    target = images.flatten(1).double()
    held = len(images) // 4
    best, penalty = float("inf"), 1.0
    for candidate in RIDGE_PENALTIES:
        fit = _ridge(design[held:], target[held:], candidate)
        error = float(((design[:held] @ fit).clamp(0, 1) - target[:held]).square().mean())
        if error < best:
            best, penalty = error, candidate
    decoder = _ridge(design, target, penalty)
    description = (f"{carried.description.split('; each pixel')[0]}; the image decoded from them by ridge regression "
                   f"(penalty {penalty:g}) fitted on the server's {len(images)} public images")
    return replace(carried, decoder=decoder, description=description)


def _ridge(design: torch.Tensor, target: torch.Tensor, penalty: float) -> torch.Tensor:
    gram = design.T @ design
    return torch.linalg.solve(gram + penalty * torch.eye(len(gram), dtype=gram.dtype), design.T @ target)


def probe(model: nn.Module, layer: str, image_shape: tuple[int, int, int],
          check: torch.Tensor | None = None) -> Carried:
    """What `model` (its current values, forward pre-hooks included) carries of an image in [0, 1] to the input
    of `layer` (module docstring).

    Parameters
    ----------
    model : nn.Module
        The model as it will be sent.
    layer : str
        The linear layer.
    image_shape : tuple[int, int, int]
        (C, H, W).
    check : torch.Tensor, optional
        Images in [0, 1] on which each feature's affine form is checked (default: 16 uniform random ones).

    Returns
    -------
    Carried
        Raises ValueError when no feature carries any pixel.
    """
    count = image_shape[0] * image_shape[1] * image_shape[2]

    def inputs(images: torch.Tensor) -> torch.Tensor:
        return layer_input(model, layer, images).flatten(1).double()

    base = inputs(torch.zeros(1, *image_shape))[0]
    response = torch.cat([inputs(torch.eye(count)[start: start + ProbeBatch].reshape(-1, *image_shape)) - base
                          for start in range(0, count, ProbeBatch)])  # (pixels, features)
    peak = response.abs().max(0).values
    member = response.abs() > 1e-6 * peak.clamp_min(1e-30)
    scale = torch.where(member, response, torch.zeros((), dtype=torch.float64)).sum(0) / member.sum(0).clamp_min(1)
    consistent = (torch.where(member, (response - scale).abs(), torch.zeros((), dtype=torch.float64)).max(0).values
                  <= AFFINE_TOLERANCE * scale.abs().clamp_min(1e-30)) & member.any(0)
    generator = torch.Generator().manual_seed(0)
    images = check if check is not None else torch.rand(16, *image_shape, generator=generator)
    actual = inputs(images)
    pixels = images.flatten(1).double()
    for start in range(0, len(scale), 512):
        stop = min(start + 512, len(scale))
        mask = member[:, start:stop].T  # (chunk, pixels)
        largest = torch.where(mask[None], pixels[:, None, :], torch.full((), -1.0, dtype=torch.float64)).amax(2)
        predicted = base[start:stop] + scale[start:stop] * largest
        error = (predicted - actual[:, start:stop]).abs().amax(0)
        consistent[start:stop] &= error <= AFFINE_TOLERANCE * scale[start:stop].abs().clamp_min(1e-30)
    features = consistent.nonzero().flatten()
    if not len(features):
        raise ValueError(f"{layer} receives nothing the carrying can read of the image")
    regions = member[:, features].T.contiguous()
    held = regions.any(0)
    fill = torch.arange(count)
    if not held.all():
        coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in image_shape], indexing="ij"), -1)
        coords = coords.reshape(count, 3).double()
        coords[:, 0] *= 1e6  # never across channels
        missing, kept = (~held).nonzero().flatten(), held.nonzero().flatten()
        fill[missing] = kept[torch.cdist(coords[missing], coords[kept]).argmin(1)]
    return Carried(features, scale[features].float(), base[features].float(), regions, fill, image_shape,
                   _describe(layer, regions, held, count, response.shape[1]))


def _describe(layer: str, regions: torch.Tensor, held: torch.Tensor, count: int, width: int) -> str:
    sizes = regions.sum(1)
    distinct = len(torch.unique(regions, dim=0))
    if bool((sizes == 1).all()) and bool(held.all()):
        return f"{layer} sees every one of the {count} pixel values exactly"
    return (f"{len(regions)} of the {width} inputs of {layer} carry the image: {distinct} distinct regions, each "
            f"the largest pixel of {int(sizes.median())} pixels of one colour (median), covering "
            f"{int(held.sum())} of {count} pixels; each pixel read as the least maximum of the regions holding "
            "it, the others copied from the nearest held pixel")


def unmixed(candidates: list[torch.Tensor]) -> list[int]:
    """The candidates (best-measured first) that are no mixture of the others.

    A row fired by two images of one class gets the same gradient from both on every row at a model's start,
    so all such rows give the same mixture and vouch for it; it is a convex combination of the two images
    (when they are found alone too), which no single image is. A candidate is dropped that lies within
    MIXTURE_RESIDUAL of a non-negative combination of the better-measured ones kept, or within NEAR_COPY of
    one (an image with a trace of another). Only the better-measured: two images whose gradients differ in
    sign mix with one weight above 1, and such a mixture and the other image rebuild the first (with that
    one's weight near 1). Then one kept is dropped where the others kept rebuild it with no weight above
    MIXTURE_LARGEST (a mixture measured better than its images).
    """
    matrix = torch.stack(candidates).double().numpy() if candidates else np.zeros((0, 0))

    def mixed(i: int, others: list[int], most: float = 1.0) -> bool:
        if not others:
            return False
        weights, residual = optimize.nnls(matrix[others].T, matrix[i])
        return bool(residual <= MIXTURE_RESIDUAL * np.linalg.norm(matrix[i]) and weights.max() <= most)

    def near(i: int, others: list[int]) -> bool:
        distance = np.linalg.norm(matrix[others] - matrix[i], axis=1)
        return bool(len(others) and distance.min() <= NEAR_COPY * np.linalg.norm(matrix[i]))

    kept: list[int] = []
    for i in range(len(candidates)):
        if not (near(i, kept) or mixed(i, kept)):
            kept.append(i)
    for i in reversed(list(kept)):  # a mixture measured better than its images: no one image dominates it
        if mixed(i, [j for j in kept if j != i], MIXTURE_LARGEST):
            kept.remove(i)
    return kept


@dataclass(frozen=True)
class CarriedReadout(Readout):
    """Rows of a linear layer read as images through what the carrying brings them (`Carried`)."""

    weight: str
    bias: str
    carried: Carried
    image_shape: tuple[int, int, int]

    def read(self, update: dict[str, torch.Tensor], count: int) -> tuple[torch.Tensor, list[str]]:
        weight = update[self.weight].detach().double().cpu()
        bias = update[self.bias].detach().double().cpu()
        if weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(f"the update's {self.weight} of shape {tuple(weight.shape)} is not the armed layer")
        fired = (bias.abs() > 1e-6 * bias.abs().max().clamp_min(1e-300)).nonzero().flatten()
        fired = fired[bias[fired].abs().argsort(descending=True)]  # strongest first: the least rounding
        groups: list[list[tuple[torch.Tensor, float]]] = []
        for row in fired.tolist():
            values = self.carried.values((weight[row] / bias[row])[None])[0]
            if not _plausible(values):
                continue
            for group in groups:
                if _same(values, group[0][0]):
                    group.append((values, float(bias[row]) ** 2))
                    break
            else:
                groups.append([(values, float(bias[row]) ** 2)])
        # each group's rows averaged, weighted by their bias change squared (a row's rounding error goes as 1 / it)
        groups.sort(key=lambda group: -sum(w for _, w in group))  # the best-measured first
        merged = [torch.stack([v * w for v, w in group]).sum(0) / sum(w for _, w in group) for group in groups]
        kept = unmixed(merged)
        found = [self.carried.image(merged[i]) for i in kept]
        status = [CONFIRMED if len(groups[i]) > 1 else UNCONFIRMED for i in kept]
        return _finish(found, status, count, self.image_shape)

    def inputs(self, update: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The layer inputs (features) the fired rows of `update` give, one per row whose carried values are
        plausible: a row one image alone fired gives that image's inputs exactly."""
        weight = update[self.weight].detach().double().cpu()
        bias = update[self.bias].detach().double().cpu()
        fired = (bias.abs() > 1e-6 * bias.abs().max().clamp_min(1e-300)).nonzero().flatten()
        return [weight[row] / bias[row] for row in fired.tolist()
                if _plausible(self.carried.values((weight[row] / bias[row])[None])[0])]

