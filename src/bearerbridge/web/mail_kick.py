"""Ending the live mail sessions a revocation leaves open, for every page that revokes a way into
mail: /account (a grant's Revoke), /account/app-passwords (an app password's Revoke) and /admin
(disabling a user). Dovecot checks a token or a password only when a client logs in, so each of
these asks Dovecot to end the sessions already open (`doveadm/`), records the answer in the audit
log (`mail_kick`) and says on the page what became of them.

The revocation is done before Dovecot is asked and stands whatever it answers: `MailKick.end`
never fails, and waits at most `[dovecot] timeout`. The command line does not come here (it runs
without a reactor); its operator has `doveadm kick` at hand.
"""

from __future__ import annotations

from bearerbridge.audit import AuditValue
from bearerbridge.doveadm.client import Doveadm
from bearerbridge.doveadm.protocol import Kicked, Outcome, Reach, Target
from bearerbridge.guard import Recorder
from bearerbridge.storage.models import User


def mail_notice(kicked: Kicked, target: Target, whose: str | None = None) -> str:
    """What the page says of the live mail sessions (Dovecot's) a revocation ended: to the user
    themselves (`whose` None), or to an admin of the user named `whose`."""
    if kicked.outcome is Outcome.NONE_OPEN:
        return "It had no mail session open." if whose is None else f"{whose} had no mail session open."
    if kicked.outcome is Outcome.ENDED and target.networks:
        return f"Ended {kicked.ended} live mail session(s) open from where it was last used."
    if kicked.outcome is Outcome.ENDED and whose is not None:
        return f"Ended {kicked.ended} live mail session(s) of {whose}."
    if kicked.outcome is Outcome.ENDED:
        return (f"Ended {kicked.ended} live mail session(s) of yours; your other mail apps reconnect by "
                "themselves.")
    why = "could not be reached" if kicked.outcome in (Outcome.UNREACHABLE, Outcome.REFUSED) else "failed"
    return (f"The mail server {why} to end live sessions: a mail app already connected stays connected until it "
            "disconnects, and cannot log in again.")


class MailKick:
    """Whose live Dovecot sessions a revocation must end, and ending them: one for the process
    (tap.py), shared by the pages that revoke. Without a doveadm client (`[dovecot] doveadm_url`
    empty) it ends nothing and says nothing."""

    def __init__(self, doveadm: Doveadm | None, audit: Recorder) -> None:
        self._doveadm = doveadm
        self._audit = audit

    @property
    def reaches_dovecot(self) -> bool:
        """Whether there is a Dovecot to ask (else reading what a revocation reached is no use)."""
        return self._doveadm is not None

    def target(self, user: User, reach: Reach | None) -> Target | None:
        """Whose sessions revoking a grant or an app password (`reach`, read before revoking it)
        must end (`doveadm.protocol.target_for`); None: nobody's, or no Dovecot to ask."""
        return None if self._doveadm is None else self._doveadm.target(user, reach)

    def all_sessions(self, user: User) -> Target | None:
        """Every Dovecot session of the user (an admin disabled them); None: no Dovecot to ask."""
        return None if self._doveadm is None else self._doveadm.all_sessions(user)

    async def end(self, target: Target | None, whose: str | None = None, **audited: AuditValue) -> str:
        """Ask Dovecot to end `target`'s sessions, record its answer as a `mail_kick` event (with
        `audited`: who asked, what was revoked, from where), and return what the page says of it
        (`mail_notice`, `whose` as there); "" when there is no one's to end. Never fails."""
        if target is None or self._doveadm is None:
            return ""
        kicked = await self._doveadm.kick(target)
        self._audit.record("mail_kick", **audited, mail_user=target.user, networks=list(target.networks) or None,
                           outcome=kicked.outcome.value, ended=kicked.ended, reason=kicked.reason or None)
        return mail_notice(kicked, target, whose)
