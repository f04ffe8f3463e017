"""The [bounces] and [suppression] tables: how failure replies are classed, and who gets no more mail."""

from __future__ import annotations

from typing import Literal

from pydantic import PrivateAttr, StrictBool, field_validator, model_validator

from postmux.config.values import Duration, _Frozen
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


SuppressedAction = Literal["refuse", "drop"]


class SuppressionSettings(_Frozen):
    """The suppression list (postmux.reputation.suppression), kept in the spool."""

    # Look recipients up at all; false: the list is kept (and added to) but nothing is refused or dropped.
    enabled: StrictBool = True
    # What a suppressed recipient gets: "refuse" answers RCPT (or the API's recipient) 550 5.7.1; "drop"
    # accepts it and drops it with a Suppressed event, so a sender's tools see one outcome per recipient.
    action: SuppressedAction = "refuse"
    # A bounce of class InvalidRecipient, BadDomain or InactiveMailbox adds its recipient.
    hard_bounces: StrictBool = True
    # How long an entry from a hard bounce lasts; 0: until removed.
    hard_bounce_expiry: Duration = 0.0
    # A complaint (an ARF report matched through [verp]) adds its recipient: who called it spam gets no more.
    complaints: StrictBool = True
