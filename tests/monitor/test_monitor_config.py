"""The monitor's configuration: files, environment overrides, secrets, and one error per problem."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

from gradwatch.alerts.state import AlertPolicy
from gradwatch.common.errors import ConfigError
from gradwatch.engine.report import Thresholds
from gradwatch.monitor.config import ChannelSpec, MonitorConfig, load_config

HAS_YAML = importlib.util.find_spec("yaml") is not None
SECRET = "T0123ABC/B0456DEF/xoxbSuperSecretToken42"
SECRET_URL = f"https://hooks.slack.com/services/{SECRET}"
FILE_SECRET = "tgram://123456789:AAFileSecretToken99/987654"
BASE_ENV = {"HOME": "/home/me"}

FULL_TOML = """\
tracking_uri = "http://127.0.0.1:5000"
experiments = ["llm-pretrain", 42]
tags = { team = "nlp" }
poll_interval = 120
state_url = "sqlite:////var/lib/gradwatch/monitor.db"

[thresholds]
warn = 1e-6
alert = 1e-4

[policies.default]
fire_after = 2
repeat_every = 10

[policies.stale]
fire_after = 3

[staleness]
enabled = false
multiple = 5

[channels.ops]
url_env = "SLACK_URL"

[channels.oncall]
url_file = "secrets/oncall"

[channels.local]
url = "json://127.0.0.1:8080"

[prometheus]
enabled = true
port = 9100
"""


def write(tmp_path: Path, text: str, name: str = "monitor.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(error: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [line for line in str(error.value).splitlines() if line.startswith("  - ")]


def test_full_toml_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_TOML), BASE_ENV)
    assert config.tracking_uri == "http://127.0.0.1:5000"
    assert config.experiments == ("llm-pretrain", "42")
    assert config.tags == {"team": "nlp"}
    assert (config.poll_interval, config.misfire_grace) == (120.0, 120.0)
    assert config.state_url == "sqlite:////var/lib/gradwatch/monitor.db"
    assert config.thresholds == Thresholds(warn=1e-6, alert=1e-4)
    assert config.policy_for("stale") == AlertPolicy(fire_after=3, repeat_every=10)
    assert config.policy_for("distance") == AlertPolicy(fire_after=2, repeat_every=10)
    assert not config.staleness.enabled and config.staleness.multiple == 5
    assert config.prometheus.enabled and config.prometheus.host == "127.0.0.1"
    assert config.prometheus.port == 9100
    # a relative url_file is relative to the config file
    assert config.channels["oncall"].url_file == str(tmp_path / "secrets" / "oncall")


def test_defaults_come_from_the_environment_passed_in() -> None:
    config = load_config(None, {"GRADWATCH_EXPERIMENTS": "1", "XDG_STATE_HOME": "/state",
                                "MLFLOW_TRACKING_URI": "http://127.0.0.1:5555"})
    assert config.tracking_uri == "http://127.0.0.1:5555"
    assert config.state_url == "sqlite:////state/gradwatch/monitor.db"
    assert config.poll_interval == config.misfire_grace == 60.0
    assert config.staleness.enabled and config.staleness.multiple == 3.0
    assert config.thresholds == Thresholds()
    assert config.policy_for("error") == AlertPolicy()
    assert not config.prometheus.enabled and config.channels == {}
    assert load_config(None, {"GRADWATCH_EXPERIMENTS": "1"}).tracking_uri is None


def test_environment_overrides_win_over_the_file(tmp_path: Path) -> None:
    env = {
        **BASE_ENV,
        "GRADWATCH_TRACKING_URI": "http://127.0.0.1:6000",
        "MLFLOW_TRACKING_URI": "http://ignored:1",  # the file and GRADWATCH_* come first
        "GRADWATCH_EXPERIMENTS": "a, b,c",
        "GRADWATCH_POLL_INTERVAL": "30",
        "GRADWATCH_MISFIRE_GRACE_TIME": "5",
        "GRADWATCH_TAGS__team": "vision",
        "GRADWATCH_THRESHOLDS__ALERT": "1e-3",
        "GRADWATCH_POLICIES__DEFAULT__REPEAT_EVERY": "none",
        "GRADWATCH_POLICIES__STALE__FIRE_AFTER": "4",
        "GRADWATCH_STALENESS__ENABLED": "true",
        "GRADWATCH_CHANNELS__OPS__URL_ENV": "OTHER_URL",
        "GRADWATCH_CHANNELS__NEW__URL_ENV": "NEW_URL",
        "GRADWATCH_PROMETHEUS": '{"enabled": false, "host": "0.0.0.0", "port": 9999}',
        "GRADWATCH_SPOOL_DIR": "/tmp/spool",  # another gradwatch setting: left alone
        "GRADWATCH_CONFIG": "/does/not/matter",  # a path was given
    }
    config = load_config(write(tmp_path, FULL_TOML), env)
    assert config.tracking_uri == "http://127.0.0.1:6000"
    assert config.experiments == ("a", "b", "c")
    assert (config.poll_interval, config.misfire_grace) == (30.0, 5.0)
    assert config.tags == {"team": "vision"}
    assert config.thresholds == Thresholds(warn=1e-6, alert=1e-3)
    assert config.policy_for("stale") == AlertPolicy(fire_after=4)
    assert config.staleness.enabled and config.staleness.multiple == 5
    assert config.channels["ops"] == ChannelSpec(url_env="OTHER_URL")
    assert config.channels["NEW"] == ChannelSpec(url_env="NEW_URL")
    assert config.prometheus.model_dump() == {"enabled": False, "host": "0.0.0.0", "port": 9999}


def test_json_list_in_the_environment_keeps_commas() -> None:
    config = load_config(None, {"GRADWATCH_EXPERIMENTS": '["a,b", "c"]'})
    assert config.experiments == ("a,b", "c")


def test_config_path_from_gradwatch_config(tmp_path: Path) -> None:
    path = write(tmp_path, 'experiments = ["x"]\n')
    assert load_config(None, {"GRADWATCH_CONFIG": str(path)}).experiments == ("x",)


def test_every_problem_in_one_error(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        experiments = []
        poll_intervall = 30
        [thresholds]
        warn = 1e-2
        alert = 1e-3
        [policies.default]
        fire_after = 0
        [policies.bogus]
        fire_after = 1
        [prometheus]
        port = 70000
        [channels.ops]
        url_env = "A"
        url_file = "/b"
        """)
    with pytest.raises(ConfigError) as error:
        load_config(path, {**BASE_ENV, "GRADWATCH_STALENESS__MULTIPLE": "0.5"})
    text = str(error.value)
    assert text.startswith(f"Invalid gradwatch monitor config (in {path}), 8 problems:")
    lines = problems(error)
    assert len(lines) == 8, text
    expected = {
        "experiments:": "at least 1 item",
        "poll_intervall:": "did you mean 'poll_interval'?",
        "thresholds:": "warn must be below",
        "policies.default:": "fire_after: Input should be greater than or equal to 1, got 0",
        "policies.bogus:": "'default', 'distance'",
        "staleness.multiple (from GRADWATCH_STALENESS__MULTIPLE):": "greater than 1",
        "prometheus.port:": "got 70000. Expected a TCP port 1-65535",
        "channels.ops:": "exactly one of url_env, url_file or url, got url_env and url_file",
    }
    for start, fragment in expected.items():
        matching = [line for line in lines if line[4:].startswith(start)]
        assert len(matching) == 1 and fragment in matching[0], (start, lines)


def test_bad_values_from_the_environment_name_the_variable() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, {"GRADWATCH_EXPERIMENTS": "a", "GRADWATCH_POLL_INTERVAL": "soon",
                           "GRADWATCH_PROMETHEUS": "{not json", "GRADWATCH_THRESHOLDS__ALRT": "1"})
    lines = problems(error)
    assert len(lines) == 3, lines
    assert "poll_interval (from GRADWATCH_POLL_INTERVAL)" in lines[1]
    assert "'soon'" in lines[1]
    assert "prometheus (from GRADWATCH_PROMETHEUS): expected JSON" in lines[0]
    assert "thresholds (from GRADWATCH_THRESHOLDS__ALRT): 'alrt' is not a threshold" in lines[2]
    assert "did you mean 'alert'?" in lines[2]


@pytest.mark.parametrize("secret_url", [
    SECRET_URL,
    "slack://TokenA/TokenB/TokenC",
    "mailto://me:hunter2pass@gmail.com",
    "https://hooks.example.com/gradwatch?token=abcd1234",
])
def test_a_token_url_in_clear_is_refused_with_the_fix(tmp_path: Path, secret_url: str) -> None:
    path = write(tmp_path, f'experiments = ["x"]\n[channels.ops]\nurl = "{secret_url}"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, BASE_ENV)
    [line] = problems(error)
    assert line.startswith("  - channels.ops: url holds a secret in clear")
    assert "url_env = \"SLACK_URL\"" in line and "url_file = " in line
    for secret in ("TokenA", "hunter2pass", "abcd1234", "xoxbSuperSecretToken42"):
        assert secret not in str(error.value)


def test_a_url_without_secrets_may_stay_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'experiments = ["x"]\n[channels.local]\nurl = "json://127.0.0.1:80"\n')
    config = load_config(path, BASE_ENV)
    assert config.resolved_channels({})["local"].get_secret_value() == "json://127.0.0.1:80"


def test_secrets_resolve_from_env_and_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "oncall").write_text(FILE_SECRET + "\n", encoding="utf-8")
    config = load_config(write(tmp_path, FULL_TOML), BASE_ENV)
    resolved = config.resolved_channels({"SLACK_URL": SECRET_URL})
    assert {name: url.get_secret_value() for name, url in resolved.items()} == {
        "ops": SECRET_URL, "oncall": FILE_SECRET, "local": "json://127.0.0.1:8080"}
    assert SECRET not in repr(resolved) and "AAFileSecretToken99" not in repr(resolved)
    notifier = config.notifiers({"SLACK_URL": SECRET_URL})["ops"]  # an https URL: JsonWebhook
    assert notifier.name == "https://hooks.slack.com/***"


def test_missing_env_var_and_file_are_one_clear_error(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_TOML), BASE_ENV)
    with pytest.raises(ConfigError) as error:
        config.resolved_channels({"SLACK_URL": "  "})
    lines = problems(error)
    assert str(error.value).startswith("Cannot read the monitor's channel URLs, 2 problems:")
    assert lines[0] == ("  - channels.ops: environment variable SLACK_URL is not set or empty; "
                        "set it to the channel's notification URL.")
    assert lines[1].startswith(f"  - channels.oncall: cannot read url_file "
                               f"{tmp_path / 'secrets' / 'oncall'}: No such file or directory")


def test_a_value_that_is_not_a_url_is_refused_without_showing_it() -> None:
    config = MonitorConfig(experiments=("x",), channels={"ops": ChannelSpec(url_env="SLACK_URL")})
    with pytest.raises(ConfigError, match="does not hold a URL with a scheme") as error:
        config.resolved_channels({"SLACK_URL": "xoxbSuperSecretToken42"})
    assert "xoxbSuperSecretToken42" not in str(error.value)


def test_no_secret_in_repr_describe_or_errors(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "oncall").write_text(FILE_SECRET, encoding="utf-8")
    env = {**BASE_ENV, "SLACK_URL": SECRET_URL,
           "GRADWATCH_STATE_URL": "postgresql://gw:dbPassw0rd99@db.internal/gradwatch",
           "GRADWATCH_TRACKING_URI": "https://ml:trackPassw0rd77@mlflow.internal/"}
    config = load_config(write(tmp_path, FULL_TOML), env)
    described = config.describe()
    assert described["channels"] == {"ops": "env:SLACK_URL",
                                     "oncall": f"file:{tmp_path / 'secrets' / 'oncall'}",
                                     "local": "json://127.0.0.1:8080"}
    assert described["state_url"] == "postgresql://gw:***@db.internal/gradwatch"
    assert described["tracking_uri"] == "https://ml:***@mlflow.internal/"
    assert described["misfire_grace_time"] == 120.0
    config.resolved_channels(env)
    shown = [repr(config), str(config), str(described)]

    # a token URL put in the environment where it does not belong, and pasted into url_env
    bad_env = {**env, "GRADWATCH_CHANNELS__OPS__URL": SECRET_URL,
               "GRADWATCH_CHANNELS__PASTED__URL_ENV": SECRET_URL,
               "GRADWATCH_CHANNELS__FILE__URL_FILE": SECRET_URL,
               "GRADWATCH_CHANNELS__TYPE": SECRET_URL,
               "GRADWATCH_POLL_INTERVAL": SECRET_URL,
               "GRADWATCH_STATE_URL": "postgresql://gw:dbPassw0rd99@db.internal:notaport/x"}
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, FULL_TOML), bad_env)
    assert len(problems(error)) == 6, str(error.value)
    shown.append(str(error.value))
    for text in shown:
        for secret in ("xoxbSuperSecretToken42", "AAFileSecretToken99", "dbPassw0rd99",
                       "trackPassw0rd77", SECRET):
            assert secret not in text, text


def test_a_file_that_cannot_be_read_or_parsed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Cannot read the monitor config .*No such file"):
        load_config(tmp_path / "missing.toml", BASE_ENV)
    with pytest.raises(ConfigError, match=r"must be a \.toml, \.yaml or \.yml file"):
        load_config(write(tmp_path, "{}", "monitor.json"), BASE_ENV)
    bad = write(tmp_path, f'experiments = ["x"]\nurl = {SECRET_URL}\n')
    with pytest.raises(ConfigError, match="is not valid TOML") as error:
        load_config(bad, BASE_ENV)
    assert SECRET not in str(error.value)


needs_yaml = pytest.mark.skipif(not HAS_YAML, reason="PyYAML is not installed")


@needs_yaml
def test_yaml_config(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        experiments: [llm-pretrain]
        poll_interval: 15
        thresholds: {warn: 1.0e-6, alert: 1.0e-4}
        policies:
          default: {fire_after: 2}
        channels:
          ops: {url_env: SLACK_URL}
        """, "monitor.yaml")
    config = load_config(path, {**BASE_ENV, "GRADWATCH_POLL_INTERVAL": "20"})
    assert config.experiments == ("llm-pretrain",) and config.poll_interval == 20.0
    assert config.policy_for("distance").fire_after == 2
    assert config.channels == {"ops": ChannelSpec(url_env="SLACK_URL")}


@needs_yaml
def test_yaml_syntax_error_does_not_quote_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, f'experiments: [x]\nchannels: {{ops: {{url: "{SECRET_URL}\n', "m.yml")
    with pytest.raises(ConfigError, match="is not valid YAML at line") as error:
        load_config(path, BASE_ENV)
    assert SECRET not in str(error.value)


def test_yaml_without_pyyaml_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ImportError
    with pytest.raises(ImportError, match="'PyYAML' package is not installed"):
        load_config(write(tmp_path, "experiments: [x]\n", "monitor.yaml"), BASE_ENV)


def test_channels_resolved_with_the_config_add_their_problems_to_the_same_error(
    tmp_path: Path,
) -> None:
    channels = """\
        [channels.ops]
        url_env = "SLACK_URL"
        [channels.oncall]
        url_file = "secrets/oncall"
        [channels.pager]
        url_env = "PAGER_URL"
        """
    path = write(tmp_path, 'experiments = ["x"]\npoll_interval = -1\n' + textwrap.dedent(
        channels) + '[channels.broken]\nurl_env = "A"\nurl_file = "/b"\n')
    env = {**BASE_ENV, "PAGER_URL": "xoxbSuperSecretToken42"}  # a token, not a URL
    with pytest.raises(ConfigError) as unresolved:
        load_config(path, env)  # the file alone: status and silence need no secrets
    assert len(problems(unresolved)) == 2
    with pytest.raises(ConfigError) as error:
        load_config(path, env, resolve_channels=True)
    lines = problems(error)
    assert str(error.value).startswith(f"Invalid gradwatch monitor config (in {path}), "
                                       f"5 problems:")
    assert [line[4:].split(":")[0] for line in lines] == [
        "poll_interval", "channels.broken", "channels.ops", "channels.oncall", "channels.pager"]
    assert "environment variable SLACK_URL is not set" in lines[2]
    assert f"cannot read url_file {tmp_path / 'secrets' / 'oncall'}" in lines[3]
    assert "does not hold a URL with a scheme" in lines[4]
    assert "xoxbSuperSecretToken42" not in str(error.value)

    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "oncall").write_text(SECRET_URL, encoding="utf-8")
    fixed = write(tmp_path, 'experiments = ["x"]\n' + textwrap.dedent(channels), "fixed.toml")
    config = load_config(fixed, {**env, "SLACK_URL": SECRET_URL,
                                 "PAGER_URL": "https://pager.example.com/p"},
                         resolve_channels=True)
    assert set(config.channels) == {"ops", "oncall", "pager"}
