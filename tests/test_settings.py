"""Settings: precedence, aliases, and the messages for bad values."""

import pytest

from fl_patch import settings
from fl_patch.errors import SettingsError


def test_defaults():
    s = settings.load(env={})
    assert (s.enabled, s.auto, s.kernels, s.dist, s.gems_global, s.strict) == (True, True, "gems", "auto", False, False)
    assert s.include == () and s.exclude == () and s.gems_unused is None and not s.kernels_explicit


def test_environment_is_read_and_lists_are_split():
    env = {"FL_PATCH_EXCLUDE": " attention, rope ,", "FL_PATCH_KERNELS": "Reference", "FL_PATCH_DIST": "native",
           "FL_PATCH_GEMS_UNUSED": "softmax", "FL_PATCH_STRICT": "yes", "FL_PATCH_LOG_LEVEL": "debug"}
    s = settings.load(env=env)
    assert s.exclude == ("attention", "rope") and s.kernels == "reference" and s.kernels_explicit
    assert s.dist == "native" and s.gems_unused == ("softmax",) and s.strict and s.log_level == "DEBUG"


def test_explicit_arguments_beat_the_environment():
    env = {"FL_PATCH_EXCLUDE": "attention", "FL_PATCH_KERNELS": "gems"}
    s = settings.load(env=env, exclude=["rope"], kernels="reference")
    assert s.exclude == ("rope",) and s.kernels == "reference"
    assert settings.load(env=env, exclude="linear,rope").exclude == ("linear", "rope")


def test_seed_plugin_aliases_and_their_precedence():
    env = {"LIGHTX2V_FL_GLOBAL_GEMS": "1", "LIGHTX2V_FL_GEMS_UNUSED": "softmax,exponential_",
           "LIGHTX2V_FL_DISABLE_FLAGCX": "1", "LIGHTX2V_FL_AUTO_REGISTER": "0"}
    s = settings.load(env=env)
    assert s.gems_global and s.gems_unused == ("softmax", "exponential_") and s.dist == "native" and not s.auto
    assert settings.load(env={**env, "FL_PATCH_DIST": "flagcx"}).dist == "flagcx"
    assert settings.load(env={"LIGHTX2V_FL_DISABLE_FLAGCX": "0"}).dist == "auto"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FL_PATCH": "maybe"}, "FL_PATCH='maybe' is not a boolean; accepted: 1, 0, true, false, yes, no, on, off"),
        ({"FL_PATCH_KERNELS": "triton"}, "FL_PATCH_KERNELS='triton' is not accepted; accepted: gems, reference"),
        ({"FL_PATCH_DIST": "nccl"}, "FL_PATCH_DIST='nccl' is not accepted; accepted: auto, flagcx, native"),
        ({"FL_PATCH_LOG_LEVEL": "loud"}, "FL_PATCH_LOG_LEVEL='LOUD' is not accepted; accepted: DEBUG, INFO"),
        ({"LIGHTX2V_FL_DISABLE_FLAGCX": "perhaps"}, "LIGHTX2V_FL_DISABLE_FLAGCX='perhaps' is not a boolean"),
    ],
)
def test_bad_values_name_the_variable_the_value_and_what_is_accepted(env, message):
    with pytest.raises(SettingsError) as error:
        settings.load(env=env)
    assert message in str(error.value)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(SettingsError, match="unknown setting"):
        settings.load(env={}, exclusions=["rope"])
    with pytest.raises(SettingsError, match="kernels='cuda' is not accepted"):
        settings.load(env={}, kernels="cuda")
    with pytest.raises(SettingsError, match="exclude: 3 is not a name"):
        settings.load(env={}, exclude=[3])
    with pytest.raises(SettingsError, match="strict='yes please' is not a boolean"):
        settings.load(env={}, strict="yes please")


def test_settings_are_frozen():
    s = settings.load(env={})
    with pytest.raises(AttributeError):
        s.kernels = "reference"


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"kernels": 3}, "kernels=3 is not accepted; accepted: gems, reference"),
        ({"kernels": ["reference"]}, "kernels=['reference'] is not accepted; accepted: gems, reference"),
        ({"dist": False}, "dist=False is not accepted; accepted: auto, flagcx, native"),
        ({"dist": 0}, "dist=0 is not accepted; accepted: auto, flagcx, native"),
        ({"include": 5}, "include=5 is not a list of names"),
        ({"gems_unused": 3}, "gems_unused=3 is not a list of names"),
        ({"exclude": b"attention"}, "exclude=b'attention' is not a list of names"),
        ({"strict": 1}, "strict=1 is not a boolean; pass True or False"),
        ({"profile": 7}, "profile=7 is not accepted; accepted: a file or folder path, or 'off'"),
    ],
)
def test_explicit_arguments_of_any_type_are_validated_like_the_environment(arguments, message):
    with pytest.raises(SettingsError) as error:
        settings.load(env={}, **arguments)
    assert message in str(error.value)


def test_at_startup_a_bad_value_is_replaced_by_its_safe_value_and_said():
    env = {"FL_PATCH_DIST": "xyz", "FL_PATCH_KERNELS": "triton", "FL_PATCH_EXCLUDE": "rope"}
    s, problems = settings.load_at_startup(env)
    assert (s.dist, s.kernels, s.exclude) == ("native", "gems", ("rope",))
    assert problems == [
        "FL_PATCH_KERNELS='triton' is not accepted; accepted: gems, reference; ignored: using the default, gems",
        "FL_PATCH_DIST='xyz' is not accepted; accepted: auto, flagcx, native; ignored: FlagCX is not made the "
        "default backend (as with native)",
    ]


def test_at_startup_strict_mode_makes_a_bad_value_an_error():
    with pytest.raises(SettingsError, match="FL_PATCH='maybe' is not a boolean"):
        settings.load_at_startup({"FL_PATCH": "maybe", "FL_PATCH_STRICT": "1"})
    s, problems = settings.load_at_startup({"FL_PATCH": "maybe"})
    assert s.enabled and problems == [
        "FL_PATCH='maybe' is not a boolean; accepted: 1, 0, true, false, yes, no, on, off; ignored: fl_patch stays "
        "enabled"]


def test_profile_setting():
    assert settings.load(env={}).profile is None
    assert settings.load(env={"FL_PATCH_PROFILE": " OFF "}).profile == "off"
    assert settings.load(env={"FL_PATCH_PROFILE": "~/p.json"}).profile.endswith("/p.json")
    assert "~" not in settings.load(env={}, profile="~/p.json").profile
