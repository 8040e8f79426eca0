"""Every option of every config group composes from the real conf/, holds only keys its builder takes and
instantiates into working objects."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import write_cifar, write_idx, write_imagefolder
from hsci import UserError
from hsci.cli import config_dir
from hsci.data import Data
from hsci.parts.build import check_loss, compose, make_model
from hsci.parts.schema import Precision


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group", sorted(d.name for d in config_dir().iterdir() if d.is_dir()))
def test_every_key_of_every_option_is_a_setting_of_its_builder(group):
    for option in options(group):
        cfg = compose([f"{group}={option}"])  # refuses a key that a builder does not take
        assert OmegaConf.missing_keys(cfg) <= {"data.root"}  # the bases leave nothing unset (imagefolder's root)


def test_a_key_no_builder_takes_is_refused_naming_where_it_came_from(tmp_path):
    with pytest.raises(UserError, match=r"^model\.hiden is not a setting of hsci\.models\.cnn \(given on the command "
                                        r"line as \+model\.hiden=64\): did you mean model\.hidden\? \(its settings: "
                                        r"hidden, dropout, conv_dropout\)$"):
        compose(["+model.hiden=64"])
    (tmp_path / "data" / "base").mkdir(parents=True)  # a user's own dataset on a base of their own
    (tmp_path / "data" / "base" / "mine.yaml").write_text(
        "# my base\ndefaults:\n  - /data/base/images@_here_\n  - _self_\nbatch_sise: 16\n")
    (tmp_path / "data" / "mine.yaml").write_text(
        "# my data\ndefaults:\n  - base/mine@_here_\n  - _self_\n_target_: hsci.data.fake\ntrain_size: 64\n"
        "test_size: 16\nimage_shape: [1, 8, 8]\nnum_classes: 2\nmean: [0.5]\nstd: [0.25]\n")
    with pytest.raises(UserError, match=rf"^data\.batch_sise is not a setting of hsci\.data\.fake \(in "
                                        rf"{tmp_path}/data/base/mine\.yaml\): did you mean data\.batch_size\?"):
        compose([f"hydra.searchpath=[file://{tmp_path}]", "data=mine"])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("# my model\n_target_: hsci.models.cnnn\n")
    with pytest.raises(UserError, match=rf"^model\._target_=hsci\.models\.cnnn cannot be imported \(in "
                                        rf"{tmp_path}/model/mine\.yaml\): ModuleNotFoundError"):
        compose([f"hydra.searchpath=[file://{tmp_path}]", "model=mine"])


def test_default_config(cfg_of):
    cfg = cfg_of()
    assert cfg.seed == 0 and cfg.trainer.device == "auto" and cfg.trainer.precision is Precision.auto
    assert cfg.data._target_ == "hsci.data.digits" and cfg.model._target_ == "hsci.models.cnn"
    assert cfg.loss._target_ == "torch.nn.CrossEntropyLoss"


@pytest.mark.parametrize("option", options("data"))
def test_data_option_instantiates(cfg_of, option, tmp_path):
    write_idx(tmp_path, "MNIST"), write_idx(tmp_path, "FashionMNIST")
    write_cifar(tmp_path), write_cifar(tmp_path, hundred=True)
    write_imagefolder(tmp_path / "images")
    root = tmp_path / "images" if option == "imagefolder" else tmp_path
    files = "root" in cfg_of(f"data={option}").data.keys()  # read from files (written above in each one's format)
    cfg = cfg_of(f"data={option}", *([f"data.root={root}"] if files else []))
    data = instantiate(cfg.data)
    assert isinstance(data, Data)
    assert len(data.train) and len(data.val) and len(data.test)
    x, y = data.train[0]
    assert tuple(x.shape) == data.input_shape
    if data.scaling.mean is None:  # tables: standardised float features
        assert x.dtype == torch.float32 and data.task in ("binary", "regression") and data.num_outputs == 1
    else:  # images: uint8, normalised later on the device
        assert x.dtype == torch.uint8 and data.task == "multiclass" and len(data.scaling.mean) == data.input_shape[0]
    loss_fn = instantiate(cfg.loss)
    check_loss(loss_fn, data.task)  # each dataset's default loss fits its task


@pytest.mark.parametrize("option", options("model"))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (1, 28, 28)])
def test_model_option_instantiates_and_maps_a_batch_to_outputs(cfg_of, option, shape):
    cfg = cfg_of(f"model={option}")
    model = make_model(cfg, shape, 7).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_models_that_need_images_refuse_tables_with_a_clear_message(cfg_of):
    for option in ("cnn", "resnet18", "vit"):
        with pytest.raises(Exception, match="needs images.*use model=mlp"):
            make_model(cfg_of(f"model={option}"), (30,), 1)


def test_cifar_stem_for_small_inputs_and_the_imagenet_stem_otherwise(cfg_of):
    cfg = cfg_of("model=resnet18")
    small = make_model(cfg, (3, 32, 32), 10)
    large = make_model(cfg, (3, 224, 224), 10)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, torch.nn.MaxPool2d)


def test_cnn_is_the_classic_mnist_network(cfg_of):
    model = make_model(cfg_of("model=cnn"), (1, 28, 28), 10)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3))]
    assert [(m.in_features, m.out_features) for m in linears] == [(9216, 128), (128, 10)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model)
    assert not any(isinstance(m, torch.nn.Softmax) for m in model)  # logits out


@pytest.mark.parametrize("option", options("loss"))
def test_loss_option_instantiates(cfg_of, option):
    loss_fn = instantiate(cfg_of(f"loss={option}").loss)
    out = torch.randn(4, 3 if option == "cross_entropy" else 1)
    target = torch.tensor([0, 1, 2, 1]) if option == "cross_entropy" else torch.rand(4, 1)
    assert loss_fn(out, target).ndim == 0


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizer_option_instantiates(cfg_of, option):
    cfg = cfg_of(f"optimizer={option}", "optimizer.lr=0.5")
    opt = instantiate(cfg.optimizer, params=torch.nn.Linear(2, 2).parameters())
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == cfg.optimizer.weight_decay


@pytest.mark.parametrize("option", options("scheduler"))
def test_scheduler_option_warms_up_then_follows_its_shape(cfg_of, option):
    extra = ["scheduler.step_epochs=4"] if option == "step" else []
    cfg = cfg_of(f"scheduler={option}", "scheduler.warmup_epochs=2", *extra)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = instantiate(cfg.scheduler, opt=opt, epochs=10, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == sorted(lrs[:10]) and lrs[0] < 0.05  # the warm-up rises from near zero
    assert max(lrs) == pytest.approx(0.1)
    if option in ("cosine", "onecycle"):
        assert lrs[-1] < 0.01 and lrs[10:] == sorted(lrs[10:], reverse=True)
    if option == "none":
        assert lrs[10:] == pytest.approx([0.1] * 40)
    if option == "step":  # x0.1 every 4 epochs (20 steps)
        assert (lrs[15], lrs[25], lrs[45]) == (pytest.approx(0.1), pytest.approx(0.01), pytest.approx(0.001))


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_option_composes_and_builds(cfg_of, option):
    cfg = cfg_of(f"experiment={option}")
    OmegaConf.resolve(cfg.trainer)
    model = make_model(cfg, (3, 32, 32), 10)
    instantiate(cfg.optimizer, params=model.parameters())
    if option == "smoke":
        assert cfg.trainer.device == "cpu" and cfg.trainer.limit_batches
    if option == "cifar10_resnet18":
        assert cfg.data._target_ == "hsci.data.cifar10" and cfg.model.arch == "resnet18"
