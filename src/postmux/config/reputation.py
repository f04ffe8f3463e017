"""The [bounces] table: how failure replies are classed."""

from __future__ import annotations

from pydantic import PrivateAttr, StrictBool, field_validator, model_validator

from postmux.config.values import _Frozen
from postmux.reputation.bounces import BounceClassifier, BounceRulesError


class BounceSettings(_Frozen):
    """Bounce classes (postmux.reputation.bounces): the shipped rule table, with an operator's rules file
    checked before it. The file is read and compiled when the configuration loads, at start and at each
    reload, so a broken rule is a config error, never a surprise at the first bounce."""

    # A TOML file of [[rule]] tables (class, code, enhanced, text), checked before the shipped ones.
    rules_file: str | None = None
    # false: only the rules_file's rules (a reply none matches is Uncategorized).
    default_rules: StrictBool = True
    _classifier: BounceClassifier | None = PrivateAttr(default=None)

    @field_validator("rules_file")
    @classmethod
    def _rules(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                BounceClassifier.load(v, shipped=False)
            except BounceRulesError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _compile(self) -> BounceSettings:
        # The file was checked above; read again here, a file that changed in between is refused still.
        try:
            self._classifier = BounceClassifier.load(self.rules_file, shipped=self.default_rules)
        except BounceRulesError as e:
            raise ValueError(f"rules_file: {e}") from None
        return self

    @property
    def classifier(self) -> BounceClassifier:
        assert self._classifier is not None  # set by _compile, or the settings were refused
        return self._classifier
