"""Recipes: every shipped recipe loads, its keys are the sections' flags, and a typo is refused."""

from pathlib import Path

import pytest
import typer

from dpsynth.cli.app import app, command_flags
from dpsynth.cli.main import main
from dpsynth.cli.recipe import load_recipe
from dpsynth.errors import BadInput

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))
FLAGS = command_flags(typer.main.get_command(app))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_recipe_loads(path):
    assert load_recipe(path, FLAGS)


def test_a_key_reaches_the_parameter_of_its_flag(tmp_path):
    # --optimizer's parameter is `private_optimizer`: the recipe key is the flag, as a user types it.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune: {optimizer: efsgd, batch-size: 64}\n")
    assert load_recipe(recipe, FLAGS)["finetune"] == {"private_optimizer": "efsgd", "batch_size": 64}


def test_an_unknown_key_is_refused_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune: {epochz: 3}\n")
    with pytest.raises(BadInput, match="no option 'epochz'"):
        load_recipe(recipe, FLAGS)
    assert main(["--recipe", str(recipe), "finetune", "--eps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epochz" in err and "--epochs" in err


def test_invalid_yaml_is_refused_naming_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("description: a run\nfinetune:\n  epochs: 3\ndescription: probe: two colons\n")
    with pytest.raises(BadInput, match=r"not valid YAML at line 4, column 19"):
        load_recipe(recipe, {"finetune": {"epochs": "epochs"}})
    assert recipe.read_text().startswith("description: a run")  # nothing changed on disk
