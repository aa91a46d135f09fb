//! The session as one value, and its rules as one pure function. [`step`] takes the state and one
//! thing that happened ([`Input`]: a sign-in's result, a refresh's, a lock, a card, a timer tick, a
//! logout, a central sign-out, a restore) and gives back the next state and what must be done about
//! it ([`Effect`]: save, forget, tell the clients, open the browser, call the provider). It waits for
//! nothing, reads no clock and touches no file, so every interleaving of its inputs can be checked:
//! `machine/model_check.rs` runs the `stateright` model checker over this very function (two
//! clinicians, three client connections, crashes and restores), and the answers a client gets
//! (`whoami`, `token`, `status`) are read from the state by the queries at the end of this file.
//!
//! These are the agent's rules, not a copy of them: the agent holds a `State<SignedIn>` behind one
//! lock and feeds every event through `step` (`Agent::apply` in `agent/session.rs`). A refresh that
//! finishes after the clinician changed is dropped (its `generation` no longer matches); a lock is
//! saved before it is announced, so a restart keeps it; only the same person's browser sign-in, or the
//! same smartcard back, lifts a lock; one browser flow at a time (a second `login` or role change
//! joins the first).
//!
//! Generic over the tokens `T` ([`Tokens`]): the provider's [`SignedIn`] in the agent, a small stand-in
//! in the model.

#[cfg(test)]
mod model_check;

use super::SessionState;
use crate::config::{Config, InactivityAction, SignalAction};
use crate::oidc::rp::SignedIn;
use crate::smartcard::Card;

/// What the rules need to know of a session's tokens.
pub trait Tokens: Clone {
    /// Who they are for (the CIS2 subject): a sign-in by another subject is a hand-over.
    fn subject(&self) -> &str;
    /// The selected role's id (`person_roleid`), if any.
    fn role(&self) -> Option<&str>;
    fn expires_at(&self) -> u64;
    /// Whether a refresh token is held.
    fn renewable(&self) -> bool;
}

impl Tokens for SignedIn {
    fn subject(&self) -> &str {
        &self.sub
    }

    fn role(&self) -> Option<&str> {
        self.user.selected_role.as_ref().map(|r| r.id.as_str())
    }

    fn expires_at(&self) -> u64 {
        self.expires_at
    }

    fn renewable(&self) -> bool {
        self.refresh_token.is_some()
    }
}

/// The part of the config the rules read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub absolute_secs: u64,
    pub inactivity_secs: u64,
    pub inactivity_action: InactivityAction,
    pub expiring_notice_secs: u64,
    pub refresh_margin_secs: u64,
    pub on_card_removal: SignalAction,
    pub same_card_unlocks: bool,
    pub allow_user_switch: bool,
}

impl Rules {
    pub fn of(config: &Config) -> Rules {
        Rules {
            absolute_secs: config.session.absolute_secs,
            inactivity_secs: config.session.inactivity_secs,
            inactivity_action: config.session.inactivity_action,
            expiring_notice_secs: config.session.expiring_notice_secs,
            refresh_margin_secs: config.session.refresh_margin_secs,
            on_card_removal: config.workstation.on_card_removal,
            same_card_unlocks: config.workstation.same_card_unlocks,
            allow_user_switch: config.workstation.allow_user_switch,
        }
    }
}

/// Everything the agent knows of the session, in one value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State<T> {
    pub session: Session<T>,
    /// The browser flow under way (sign-in or role change), if any: there is never a second.
    pub flight: Option<Flight>,
    /// Changes whenever the person behind the session changes or signs in again (sign-in, sign-out,
    /// hand-over, role change): work begun for an earlier generation is not applied to this one.
    pub generation: u64,
    /// Changes whenever answers already computed must not be delivered any more: every change of
    /// `generation`, and every lock.
    pub epoch: u64,
    /// How many times tokens were installed: a caller that waited for a refresh sees one happened.
    pub installs: u64,
    pub readers: Readers,
}

/// Whose session it is, and whether it is locked. A lock without a session, or a card lock without a
/// lock, cannot be written down.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Session<T> {
    SignedOut,
    SignedIn(Active<T>),
    /// Tokens and identity are withheld until the same person signs in again (or the same card is
    /// back, for a card lock).
    Locked(Active<T>, LockReason),
}

/// A session that exists: its tokens and its timers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Active<T> {
    pub tokens: T,
    /// The browser sign-in the absolute limit counts from.
    pub signed_in_at: u64,
    pub last_activity: u64,
    /// The clients were told the session is about to end (`session_expiring`).
    pub expiring_announced: bool,
    pub renewal: Renewal,
    /// When the current tokens were installed (0: restored from the store, age unknown).
    pub tokens_installed_at: u64,
    /// The smartcard that was in a reader at sign-in: only its removal counts, only it unlocks.
    pub card: Option<Card>,
}

/// The refresh's backoff after provider failures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Renewal {
    /// No background attempt before this.
    pub backoff_until: u64,
    pub backoff_step: u32,
    /// A client's request reaches the provider at most once a second, whatever the backoff.
    pub last_attempt: u64,
    pub last_error: Option<String>,
}

/// Why a session is locked. Clients are told it in words (`status.locked_reason`, the `locked` event,
/// error -32004: its `Display`), and the store keeps those same words, so a session saved before this
/// type existed reads back as it was ([`LockReason::from_words`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LockReason {
    /// The workstation was locked (`on_os_lock = "lock"`).
    Workstation,
    /// No program used the session for `secs` (`inactivity_action = "lock"`).
    Inactivity { secs: u64 },
    /// The session's smartcard was taken out (`on_card_removal = "lock"`).
    CardRemoved,
    /// The agent restarted with a smartcard session: the card must be seen in a reader again.
    Restarted,
    /// Any other words a lock was asked for with (or an inactivity lock read back from the store).
    Other(String),
}

impl LockReason {
    /// The lock came from the session's smartcard (taken out, or not yet seen after a restart), so
    /// that card back may lift it.
    pub fn by_card(&self) -> bool {
        matches!(self, LockReason::CardRemoved | LockReason::Restarted)
    }

    /// The reason said in `words` (as `Display` writes them).
    pub fn from_words(words: &str) -> LockReason {
        match words {
            WORKSTATION_LOCKED => LockReason::Workstation,
            CARD_REMOVED => LockReason::CardRemoved,
            RESTART_LOCK => LockReason::Restarted,
            other => LockReason::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for LockReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockReason::Workstation => f.write_str(WORKSTATION_LOCKED),
            LockReason::Inactivity { secs } => write!(
                f,
                "no program used the session for {}",
                human_duration(*secs)
            ),
            LockReason::CardRemoved => f.write_str(CARD_REMOVED),
            LockReason::Restarted => f.write_str(RESTART_LOCK),
            LockReason::Other(words) => f.write_str(words),
        }
    }
}

impl From<&str> for LockReason {
    fn from(words: &str) -> LockReason {
        LockReason::from_words(words)
    }
}

/// What a browser flow does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlightKind {
    SignIn,
    /// Re-authentication with role selection, for the clinician already signed in.
    ChangeRole,
}

/// The browser flow under way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Flight {
    pub kind: FlightKind,
    /// The generation it began in: a role change for a session that ended meanwhile is not applied.
    pub generation: u64,
    /// Who was signed in when it began.
    pub subject: Option<String>,
}

/// The smartcard readers, as the PC/SC watcher reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Readers {
    /// The card in a reader now.
    pub present: Option<Card>,
    /// Whether the watcher has reported any card yet (`status.smartcard_present` is null until then).
    pub seen_any: bool,
}

/// What is kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Snapshot<T> {
    pub tokens: T,
    pub signed_in_at: u64,
    pub lock: Option<LockReason>,
    pub card: Option<Card>,
}

/// Who wants the token renewed: the background renewal obeys the backoff; a client's request may reach
/// the provider once a second whatever the backoff, so the first request after an outage finds it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    Client,
    Background,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input<T> {
    /// A sign-in was asked for: by a program (`login`), or by the person at the keyboard
    /// (`cis2ctl login`, the window), for whom a sign-in while someone is signed in is a switch.
    Login {
        at_keyboard: bool,
        now: u64,
    },
    /// `change_role`.
    ChangeRole,
    /// The sign-in flight ended: the tokens, or `None` when it failed.
    SignInFinished {
        now: u64,
        result: Option<T>,
    },
    /// The role-change flight ended: the tokens, or `None` when it failed.
    RoleChangeFinished {
        now: u64,
        result: Option<T>,
    },
    /// The window's Cancel.
    CancelFlight,
    /// A refresh is wanted (a client's `token`, or the timer's [`Effect::RenewInBackground`]).
    RefreshStarting {
        caller: Caller,
        now: u64,
    },
    /// The provider answered a refresh begun in `generation`.
    RefreshFinished {
        generation: u64,
        now: u64,
        outcome: Refreshed<T>,
    },
    /// The workstation was locked (`on_os_lock = "lock"`), or another lock was asked for.
    Lock {
        reason: LockReason,
    },
    CardInserted {
        card: Card,
        now: u64,
    },
    CardRemoved {
        card: Card,
    },
    /// A permitted request: the inactivity clock starts again.
    Activity {
        now: u64,
    },
    /// The timers: absolute limit, inactivity, renewal ahead of expiry, expiry.
    Tick {
        now: u64,
    },
    /// Signed out here (`logout`, a workstation signal, a card): the session is also ended at the
    /// provider.
    Logout {
        reason: String,
    },
    /// The session was ended centrally (back-channel logout, reported for `generation`).
    EndedElsewhere {
        generation: u64,
        reason: String,
    },
    /// At start: what the store holds.
    Restore {
        stored: Option<Snapshot<T>>,
        now: u64,
    },
}

/// How a refresh ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Refreshed<T> {
    Renewed(T),
    /// The provider ended the session (refresh refused, subject changed).
    Ended(String),
    /// Anything else: the session is kept; the next background attempt backs off. `jitter_percent`
    /// (80–119) spreads the agents of a ward apart.
    Failed {
        error: String,
        jitter_percent: u8,
    },
}

/// What the agent must do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Effect<T> {
    /// Save the session (before anything about it is announced).
    Save(Snapshot<T>),
    ClearStore,
    Notify(Notice),
    OpenBrowser(FlightKind),
    /// Stop the browser flow under way.
    AbortFlight,
    /// Ask the provider to refresh, for the current generation.
    CallProvider,
    /// The timer wants the token renewed ahead of need.
    RenewInBackground,
    /// Revoke and end the ended session at the provider, in the background.
    EndAtProvider(T),
    /// Forget the API Platform tokens exchanged for the session.
    ForgetAudienceTokens,
    /// The input's caller is refused.
    Refused(Refusal),
}

/// What the clients are told (the user they carry is the session's after the step).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Notice {
    SignedIn,
    SignedOut { reason: String },
    TokenRefreshed { expires_at: u64 },
    RoleChanged,
    SessionExpiring { expires_at: u64 },
    Locked { reason: LockReason },
    Unlocked,
}

/// Why a request or a result is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Refusal {
    NotSignedIn,
    Locked(LockReason),
    /// At the keyboard, someone is signed in and switching is not allowed.
    AlreadySignedIn,
    /// The browser sign-in was another person's and switching is not allowed.
    OtherClinician {
        locked: bool,
    },
    /// The role change was completed by another person.
    RoleChangeByOther,
    /// The session ended or changed hands while the work was under way.
    SessionChanged,
    /// The browser flow failed, or its result came for no flow of that kind.
    FlightFailed,
    /// A refresh is not due yet (backoff): the next attempt is due in `due_in` seconds.
    RefreshNotDue {
        due_in: u64,
    },
}

pub const WORKSTATION_LOCKED: &str = "the workstation was locked";
/// Why a restored smartcard session starts locked.
pub const RESTART_LOCK: &str =
    "the agent restarted; the smartcard the clinician signed in with must be in the reader";
pub const CARD_REMOVED: &str = "the smartcard was removed";
pub const ANOTHER_CARD: &str = "another smartcard was inserted";
pub const ANOTHER_CLINICIAN: &str = "another clinician signed in";

impl<T> Default for State<T> {
    fn default() -> Self {
        State {
            session: Session::SignedOut,
            flight: None,
            generation: 0,
            epoch: 0,
            installs: 0,
            readers: Readers::default(),
        }
    }
}

/// The next state and what to do, for `input` in `state`.
pub fn step<T: Tokens>(
    rules: &Rules,
    state: State<T>,
    input: Input<T>,
) -> (State<T>, Vec<Effect<T>>) {
    let mut s = state;
    let mut fx = Vec::new();
    match input {
        Input::Login { at_keyboard, now } => {
            if at_keyboard {
                if s.flight.is_some() {
                    // Joined.
                } else if s.active().is_some()
                    && !s.needs_authentication(rules, now)
                    && !rules.allow_user_switch
                {
                    fx.push(Effect::Refused(Refusal::AlreadySignedIn));
                } else {
                    start_flight(&mut s, &mut fx, FlightKind::SignIn);
                }
            } else if s.needs_authentication(rules, now) {
                start_flight(&mut s, &mut fx, FlightKind::SignIn);
            }
        }
        Input::ChangeRole => match s.unlocked() {
            Err(refusal) => fx.push(Effect::Refused(refusal)),
            Ok(_) => start_flight(&mut s, &mut fx, FlightKind::ChangeRole),
        },
        Input::SignInFinished { now, result } => {
            let flight = s.flight.take_if(|f| f.kind == FlightKind::SignIn);
            match (flight, result) {
                (Some(_), Some(tokens)) => signed_in(rules, &mut s, &mut fx, tokens, now),
                _ => fx.push(Effect::Refused(Refusal::FlightFailed)),
            }
        }
        Input::RoleChangeFinished { now, result } => {
            let flight = s.flight.take_if(|f| f.kind == FlightKind::ChangeRole);
            match (flight, result) {
                (Some(flight), Some(tokens)) => {
                    if flight.subject.as_deref() != Some(tokens.subject()) {
                        fx.push(Effect::Refused(Refusal::RoleChangeByOther));
                    } else if flight.generation != s.generation || s.active().is_none() {
                        fx.push(Effect::Refused(Refusal::SessionChanged));
                    } else {
                        let was_locked = matches!(s.session, Session::Locked(..));
                        let role_before =
                            s.active().and_then(|a| a.tokens.role().map(String::from));
                        let role_changed = role_before.as_deref() != tokens.role();
                        install_fresh(&mut s, &mut fx, tokens, now);
                        // A browser authentication of the same person lifts a lock taken meanwhile, as
                        // a sign-in does; the clients are told.
                        if was_locked {
                            fx.push(Effect::Notify(Notice::Unlocked));
                        }
                        // The same role picked again is no change: an EHR told would act for nothing.
                        if role_changed {
                            fx.push(Effect::Notify(Notice::RoleChanged));
                        }
                    }
                }
                _ => fx.push(Effect::Refused(Refusal::FlightFailed)),
            }
        }
        Input::CancelFlight => {
            if s.flight.take().is_some() {
                fx.push(Effect::AbortFlight);
            }
        }
        Input::RefreshStarting { caller, now } => match &mut s.session {
            Session::SignedOut => fx.push(Effect::Refused(Refusal::NotSignedIn)),
            Session::Locked(_, lock) => fx.push(Effect::Refused(Refusal::Locked(lock.clone()))),
            Session::SignedIn(active) => {
                if active.tokens.renewable() {
                    let renewal = &mut active.renewal;
                    let next_attempt = match caller {
                        Caller::Background => renewal.backoff_until,
                        Caller::Client => renewal.backoff_until.min(renewal.last_attempt + 1),
                    };
                    if now >= next_attempt {
                        renewal.last_attempt = now;
                        fx.push(Effect::CallProvider);
                    } else {
                        fx.push(Effect::Refused(Refusal::RefreshNotDue {
                            due_in: next_attempt - now,
                        }));
                    }
                }
            }
        },
        Input::RefreshFinished {
            generation,
            now,
            outcome,
        } => {
            let current = generation == s.generation && s.active().is_some();
            match outcome {
                // The clinician changed (or signed out) while the provider answered: dropped.
                Refreshed::Renewed(_) if !current => {
                    fx.push(Effect::Refused(Refusal::SessionChanged));
                }
                Refreshed::Renewed(tokens) => {
                    let expires_at = tokens.expires_at();
                    let mut role_changed = false;
                    if let Some(active) = s.active_mut() {
                        role_changed = active.tokens.role() != tokens.role();
                        active.tokens = tokens;
                        active.last_activity = active.last_activity.max(now);
                        active.expiring_announced = false;
                        active.renewal = Renewal {
                            last_attempt: active.renewal.last_attempt,
                            ..Renewal::default()
                        };
                        active.tokens_installed_at = now;
                    }
                    s.installs += 1;
                    // Saved before the old refresh token is dropped: a crash loses nothing.
                    if let Some(snapshot) = s.snapshot() {
                        fx.push(Effect::Save(snapshot));
                    }
                    fx.push(Effect::Notify(Notice::TokenRefreshed { expires_at }));
                    if role_changed {
                        fx.push(Effect::Notify(Notice::RoleChanged));
                    }
                }
                Refreshed::Ended(reason) if current => end(&mut s, &mut fx, reason, false),
                Refreshed::Failed {
                    error,
                    jitter_percent,
                } if current => {
                    if let Some(active) = s.active_mut() {
                        let renewal = &mut active.renewal;
                        renewal.last_error = Some(error);
                        let base = 1u64 << renewal.backoff_step.min(6);
                        let jittered = (base * u64::from(jitter_percent) + 50) / 100;
                        renewal.backoff_until = now + jittered.clamp(1, 60);
                        renewal.backoff_step += 1;
                    }
                }
                Refreshed::Ended(_) | Refreshed::Failed { .. } => {}
            }
        }
        Input::Lock { reason } => {
            if s.active().is_some() {
                fx.push(Effect::ForgetAudienceTokens);
                lock(&mut s, &mut fx, reason);
            }
        }
        Input::CardInserted { card, now } => {
            s.readers.present = Some(card.clone());
            s.readers.seen_any = true;
            if let Session::Locked(active, lock) = &s.session
                && lock.by_card()
            {
                let valid = active.tokens.expires_at() > now || active.tokens.renewable();
                let (same, other) = match (&active.card, &card) {
                    (Some(Card::Known(bound)), Card::Known(inserted)) => {
                        (bound == inserted, bound != inserted)
                    }
                    // Either card cannot be told apart from others: the lock stays until someone
                    // signs in.
                    _ => (false, false),
                };
                if same && rules.same_card_unlocks && valid {
                    s.session = match std::mem::replace(&mut s.session, Session::SignedOut) {
                        Session::Locked(mut active, _) => {
                            active.last_activity = now;
                            Session::SignedIn(active)
                        }
                        other => other,
                    };
                    if let Some(snapshot) = s.snapshot() {
                        fx.push(Effect::Save(snapshot));
                    }
                    fx.push(Effect::Notify(Notice::Unlocked));
                } else if other {
                    end(&mut s, &mut fx, ANOTHER_CARD.into(), true);
                }
            }
        }
        Input::CardRemoved { card } => {
            s.readers.seen_any = true;
            if s.readers.present.as_ref() == Some(&card) {
                s.readers.present = None;
            }
            let bound = s.active().is_some_and(|a| a.card.as_ref() == Some(&card));
            if bound {
                match rules.on_card_removal {
                    SignalAction::Lock => {
                        if matches!(s.session, Session::SignedIn(_)) {
                            fx.push(Effect::ForgetAudienceTokens);
                            lock(&mut s, &mut fx, LockReason::CardRemoved);
                        }
                    }
                    SignalAction::SignOut => end(&mut s, &mut fx, CARD_REMOVED.into(), true),
                    SignalAction::Ignore => {}
                }
            }
        }
        Input::Activity { now } => {
            if let Some(active) = s.active_mut() {
                active.last_activity = now;
            }
        }
        Input::Tick { now } => tick(rules, &mut s, &mut fx, now),
        Input::Logout { reason } => end(&mut s, &mut fx, reason, true),
        Input::EndedElsewhere { generation, reason } => {
            if generation == s.generation {
                end(&mut s, &mut fx, reason, false);
            }
        }
        Input::Restore { stored, now } => {
            if let (Session::SignedOut, Some(stored)) = (&s.session, stored) {
                if stored.tokens.expires_at() <= now && !stored.tokens.renewable() {
                    fx.push(Effect::ClearStore);
                } else {
                    let active = Active {
                        tokens: stored.tokens,
                        signed_in_at: stored.signed_in_at,
                        last_activity: now,
                        expiring_announced: false,
                        renewal: Renewal::default(),
                        tokens_installed_at: 0,
                        card: stored.card,
                    };
                    // Signed in with a smartcard: after a restart the agent cannot know the card
                    // stayed in, so the session waits, locked, until the reader reports that card.
                    let lock = stored.lock.or_else(|| {
                        (active.card.is_some() && rules.on_card_removal != SignalAction::Ignore)
                            .then_some(LockReason::Restarted)
                    });
                    s.session = match lock {
                        Some(lock) => Session::Locked(active, lock),
                        None => Session::SignedIn(active),
                    };
                }
            }
        }
    }
    (s, fx)
}

fn start_flight<T: Tokens>(s: &mut State<T>, fx: &mut Vec<Effect<T>>, kind: FlightKind) {
    if s.flight.is_none() {
        s.flight = Some(Flight {
            kind,
            generation: s.generation,
            subject: s.active().map(|a| a.tokens.subject().to_string()),
        });
        fx.push(Effect::OpenBrowser(kind));
    }
}

/// A browser sign-in succeeded: the same person again (unlocks), someone new, or a hand-over.
fn signed_in<T: Tokens>(
    rules: &Rules,
    s: &mut State<T>,
    fx: &mut Vec<Effect<T>>,
    tokens: T,
    now: u64,
) {
    let was_locked = matches!(s.session, Session::Locked(..));
    let previous = s.active().map(|a| {
        (
            a.tokens.subject().to_string(),
            a.tokens.role().map(String::from),
        )
    });
    match previous {
        Some((subject, role)) if subject == tokens.subject() => {
            let role_changed = role.as_deref() != tokens.role();
            install_fresh(s, fx, tokens, now);
            fx.push(Effect::Notify(if was_locked {
                Notice::Unlocked
            } else {
                Notice::SignedIn
            }));
            // Unlocking (or re-authenticating) may pick another role at the provider: a client
            // still showing the old one must be told.
            if role_changed {
                fx.push(Effect::Notify(Notice::RoleChanged));
            }
        }
        Some(_) if !rules.allow_user_switch => {
            fx.push(Effect::Refused(Refusal::OtherClinician {
                locked: was_locked,
            }));
        }
        previous => {
            if previous.is_some() {
                end(s, fx, ANOTHER_CLINICIAN.into(), false);
            }
            install_fresh(s, fx, tokens, now);
            fx.push(Effect::Notify(Notice::SignedIn));
        }
    }
}

/// Makes `tokens` the session of a fresh browser authentication: saved first, unlocked, bound to the
/// card in the reader now, and a new generation.
fn install_fresh<T: Tokens>(s: &mut State<T>, fx: &mut Vec<Effect<T>>, tokens: T, now: u64) {
    let last_attempt = s.active().map_or(0, |a| a.renewal.last_attempt);
    let active = Active {
        tokens,
        signed_in_at: now,
        last_activity: now,
        expiring_announced: false,
        renewal: Renewal {
            last_attempt,
            ..Renewal::default()
        },
        tokens_installed_at: now,
        card: s.readers.present.clone(),
    };
    s.session = Session::SignedIn(active);
    s.installs += 1;
    s.generation += 1;
    s.epoch += 1;
    if let Some(snapshot) = s.snapshot() {
        fx.push(Effect::Save(snapshot));
    }
}

/// Locks a signed-in session; saved before it is announced, so a restart keeps it.
fn lock<T: Tokens>(s: &mut State<T>, fx: &mut Vec<Effect<T>>, reason: LockReason) {
    s.session = match std::mem::replace(&mut s.session, Session::SignedOut) {
        Session::SignedIn(active) => Session::Locked(active, reason.clone()),
        other => {
            s.session = other;
            return;
        }
    };
    // Answers read before the lock are not delivered after it.
    s.epoch += 1;
    if let Some(snapshot) = s.snapshot() {
        fx.push(Effect::Save(snapshot));
    }
    fx.push(Effect::Notify(Notice::Locked { reason }));
}

/// Ends the session (if any) and forgets what is saved; `at_provider`: end it there too.
fn end<T: Tokens>(s: &mut State<T>, fx: &mut Vec<Effect<T>>, reason: String, at_provider: bool) {
    let ended = match std::mem::replace(&mut s.session, Session::SignedOut) {
        Session::SignedOut => None,
        Session::SignedIn(active) | Session::Locked(active, _) => Some(active.tokens),
    };
    if ended.is_some() {
        s.generation += 1;
        s.epoch += 1;
    }
    fx.push(Effect::ForgetAudienceTokens);
    fx.push(Effect::ClearStore);
    if let Some(tokens) = ended {
        fx.push(Effect::Notify(Notice::SignedOut { reason }));
        if at_provider {
            fx.push(Effect::EndAtProvider(tokens));
        }
    }
}

/// The timers: absolute limit, inactivity, renewal before expiry, and the end of a session that
/// cannot be renewed (announced `expiring_notice_secs` ahead).
fn tick<T: Tokens>(rules: &Rules, s: &mut State<T>, fx: &mut Vec<Effect<T>>, now: u64) {
    let Some(active) = s.active() else { return };
    let expires_at = active.tokens.expires_at();
    let renewable = active.tokens.renewable();
    let locked = matches!(s.session, Session::Locked(..));
    if now >= active.signed_in_at.saturating_add(rules.absolute_secs) {
        let reason = format!(
            "the session reached its maximum length ({})",
            human_duration(rules.absolute_secs)
        );
        end(s, fx, reason, false);
        return;
    }
    if !locked && now >= active.last_activity.saturating_add(rules.inactivity_secs) {
        let reason = LockReason::Inactivity {
            secs: rules.inactivity_secs,
        };
        match rules.inactivity_action {
            InactivityAction::Lock => {
                fx.push(Effect::ForgetAudienceTokens);
                lock(s, fx, reason);
            }
            InactivityAction::SignOut => {
                end(s, fx, reason.to_string(), false);
                return;
            }
            InactivityAction::None => {}
        }
    }
    let Some(active) = s.active() else { return };
    let locked = matches!(s.session, Session::Locked(..));
    if renewable {
        if !locked && now + renewal_margin(rules, active) >= expires_at {
            fx.push(Effect::RenewInBackground);
        }
    } else {
        if !active.expiring_announced && now + rules.expiring_notice_secs >= expires_at {
            if let Some(active) = s.active_mut() {
                active.expiring_announced = true;
            }
            fx.push(Effect::Notify(Notice::SessionExpiring { expires_at }));
        }
        if now >= expires_at {
            end(
                s,
                fx,
                "the session expired and the provider gave no refresh token; sign in again".into(),
                false,
            );
        }
    }
}

/// How long before expiry the token is renewed ahead of need: `refresh_margin_secs`, or half the
/// token's lifetime when the provider's tokens live shorter than twice that (else every token would be
/// inside the margin from the moment it arrives, and renewed on every tick).
pub fn renewal_margin<T: Tokens>(rules: &Rules, active: &Active<T>) -> u64 {
    let margin = rules.refresh_margin_secs;
    match active.tokens_installed_at {
        0 => margin,
        installed_at => margin.min(active.tokens.expires_at().saturating_sub(installed_at) / 2),
    }
}

pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} seconds"),
        s if s < 7200 => format!("{} minutes", s / 60),
        s => format!("{} hours", s / 3600),
    }
}

/// The queries: what the answers are read from.
impl<T: Tokens> State<T> {
    /// The session, locked or not.
    pub fn active(&self) -> Option<&Active<T>> {
        match &self.session {
            Session::SignedOut => None,
            Session::SignedIn(active) | Session::Locked(active, _) => Some(active),
        }
    }

    fn active_mut(&mut self) -> Option<&mut Active<T>> {
        match &mut self.session {
            Session::SignedOut => None,
            Session::SignedIn(active) | Session::Locked(active, _) => Some(active),
        }
    }

    pub fn lock(&self) -> Option<&LockReason> {
        match &self.session {
            Session::Locked(_, lock) => Some(lock),
            _ => None,
        }
    }

    /// The session if its tokens and identity may be answered: signed in and not locked.
    pub fn unlocked(&self) -> Result<&Active<T>, Refusal> {
        match &self.session {
            Session::SignedOut => Err(Refusal::NotSignedIn),
            Session::Locked(_, lock) => Err(Refusal::Locked(lock.clone())),
            Session::SignedIn(active) => Ok(active),
        }
    }

    /// The session's token if it lasts beyond `now + min_valid` and, `with_margin`, beyond the
    /// renewal margin (`None`: a refresh is needed). Never while locked.
    pub fn cached_token(
        &self,
        rules: &Rules,
        now: u64,
        min_valid: u64,
        with_margin: bool,
    ) -> Result<Option<&Active<T>>, Refusal> {
        let active = self.unlocked()?;
        let needed = if with_margin {
            min_valid.max(renewal_margin(rules, active))
        } else {
            min_valid
        };
        Ok((active.tokens.expires_at() > now + needed).then_some(active))
    }

    /// Whether `login` must go to the browser: nobody signed in, the session locked, or a session that
    /// cannot be renewed and is about to end.
    pub fn needs_authentication(&self, rules: &Rules, now: u64) -> bool {
        match &self.session {
            Session::SignedOut | Session::Locked(..) => true,
            Session::SignedIn(active) => {
                !active.tokens.renewable()
                    && now + rules.expiring_notice_secs >= active.tokens.expires_at()
            }
        }
    }

    /// `status.state`.
    pub fn state(&self) -> SessionState {
        match (&self.session, &self.flight) {
            (Session::Locked(..), _) => SessionState::Locked,
            (_, Some(_)) => SessionState::SigningIn,
            (Session::SignedIn(_), None) => SessionState::SignedIn,
            (Session::SignedOut, None) => SessionState::SignedOut,
        }
    }

    /// What is saved of the session now.
    pub fn snapshot(&self) -> Option<Snapshot<T>> {
        let active = self.active()?;
        Some(Snapshot {
            tokens: active.tokens.clone(),
            signed_in_at: active.signed_in_at,
            lock: self.lock().cloned(),
            card: active.card.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    struct Tok {
        who: &'static str,
        role: &'static str,
        expires_at: u64,
        renewable: bool,
    }

    impl Tokens for Tok {
        fn subject(&self) -> &str {
            self.who
        }
        fn role(&self) -> Option<&str> {
            Some(self.role)
        }
        fn expires_at(&self) -> u64 {
            self.expires_at
        }
        fn renewable(&self) -> bool {
            self.renewable
        }
    }

    fn tok(who: &'static str, expires_at: u64) -> Tok {
        Tok {
            who,
            role: "nurse",
            expires_at,
            renewable: true,
        }
    }

    fn rules() -> Rules {
        Rules::of(&Config::sandbox())
    }

    fn run(state: State<Tok>, input: Input<Tok>) -> (State<Tok>, Vec<Effect<Tok>>) {
        step(&rules(), state, input)
    }

    fn signed_in_as(who: &'static str, now: u64) -> State<Tok> {
        let (s, _) = run(
            State::default(),
            Input::Login {
                at_keyboard: false,
                now,
            },
        );
        let (s, fx) = run(
            s,
            Input::SignInFinished {
                now,
                result: Some(tok(who, now + 3_600)),
            },
        );
        assert!(fx.contains(&Effect::Notify(Notice::SignedIn)), "{fx:?}");
        s
    }

    /// The person at the keyboard signs in through the browser.
    fn at_the_keyboard(s: State<Tok>, tokens: Tok, now: u64) -> (State<Tok>, Vec<Effect<Tok>>) {
        let (s, _) = run(
            s,
            Input::Login {
                at_keyboard: true,
                now,
            },
        );
        run(
            s,
            Input::SignInFinished {
                now,
                result: Some(tokens),
            },
        )
    }

    fn notices(fx: &[Effect<Tok>]) -> Vec<Notice> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Notify(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_lock_withholds_everything_is_saved_before_it_is_told_and_only_the_same_person_lifts_it() {
        let s = signed_in_as("A", 1_000);
        let epoch = s.epoch;
        let (s, fx) = run(
            s,
            Input::Lock {
                reason: LockReason::Workstation,
            },
        );
        let save = fx
            .iter()
            .position(|e| matches!(e, Effect::Save(snap) if snap.lock.is_some()));
        let told = fx
            .iter()
            .position(|e| matches!(e, Effect::Notify(Notice::Locked { .. })));
        assert!(save.is_some() && save < told, "{fx:?}");
        assert_eq!(s.state(), SessionState::Locked);
        assert_ne!(
            s.epoch, epoch,
            "answers read before the lock are not delivered"
        );
        assert!(matches!(s.unlocked(), Err(Refusal::Locked { .. })));
        assert!(matches!(
            s.cached_token(&rules(), 1_001, 0, false),
            Err(Refusal::Locked { .. })
        ));
        // Someone else's browser sign-in does not lift it (no switching by default).
        let (s, fx) = at_the_keyboard(s, tok("B", 2_000), 1_003);
        assert!(fx.contains(&Effect::Refused(Refusal::OtherClinician { locked: true })));
        assert_eq!(s.state(), SessionState::Locked);
        // The same person does, and the clients are told it is unlocked (not a new sign-in).
        let (s, fx) = at_the_keyboard(s, tok("A", 2_000), 1_005);
        assert_eq!(notices(&fx), vec![Notice::Unlocked]);
        assert_eq!(s.unlocked().map(|a| a.tokens.who), Ok("A"));
    }

    #[test]
    fn a_lock_reason_reads_back_from_the_words_it_is_told_and_saved_in() {
        for reason in [
            LockReason::Workstation,
            LockReason::CardRemoved,
            LockReason::Restarted,
            LockReason::Other("asked by the test".into()),
        ] {
            assert_eq!(LockReason::from_words(&reason.to_string()), reason);
        }
        assert_eq!(
            LockReason::Workstation.to_string(),
            "the workstation was locked"
        );
        let idle = LockReason::Inactivity { secs: 900 };
        assert_eq!(
            idle.to_string(),
            "no program used the session for 15 minutes"
        );
        // Read back from a store, an inactivity lock keeps its words and is no card lock.
        let back = LockReason::from_words(&idle.to_string());
        assert_eq!(back.to_string(), idle.to_string());
        assert!(!back.by_card());
        assert!(LockReason::CardRemoved.by_card() && LockReason::Restarted.by_card());
        assert!(!LockReason::Workstation.by_card());
    }

    #[test]
    fn a_refresh_that_finishes_after_a_hand_over_is_dropped() {
        let allow = Rules {
            allow_user_switch: true,
            ..rules()
        };
        let s = signed_in_as("A", 1_000);
        let (s, fx) = step(
            &allow,
            s,
            Input::RefreshStarting {
                caller: Caller::Client,
                now: 1_100,
            },
        );
        assert!(fx.contains(&Effect::CallProvider));
        let began = s.generation;
        let (s, _) = step(
            &allow,
            s,
            Input::Login {
                at_keyboard: true,
                now: 1_101,
            },
        );
        let (s, fx) = step(
            &allow,
            s,
            Input::SignInFinished {
                now: 1_102,
                result: Some(tok("B", 2_000)),
            },
        );
        assert_eq!(
            notices(&fx),
            vec![
                Notice::SignedOut {
                    reason: ANOTHER_CLINICIAN.into()
                },
                Notice::SignedIn
            ]
        );
        let (s, fx) = step(
            &allow,
            s,
            Input::RefreshFinished {
                generation: began,
                now: 1_103,
                outcome: Refreshed::Renewed(tok("A", 3_000)),
            },
        );
        assert_eq!(fx, vec![Effect::Refused(Refusal::SessionChanged)]);
        assert_eq!(s.unlocked().map(|a| a.tokens.who), Ok("B"));
    }

    #[test]
    fn a_second_login_joins_the_browser_flow_under_way() {
        let (s, fx) = run(
            State::default(),
            Input::Login {
                at_keyboard: false,
                now: 1,
            },
        );
        assert_eq!(fx, vec![Effect::OpenBrowser(FlightKind::SignIn)]);
        assert_eq!(s.state(), SessionState::SigningIn);
        let (s, fx) = run(
            s,
            Input::Login {
                at_keyboard: true,
                now: 2,
            },
        );
        assert!(fx.is_empty(), "{fx:?}");
        let (s, fx) = run(s, Input::CancelFlight);
        assert_eq!(fx, vec![Effect::AbortFlight]);
        assert_eq!(s.state(), SessionState::SignedOut);
    }

    #[test]
    fn the_card_locks_the_same_card_unlocks_and_another_card_signs_out() {
        let (s, _) = run(
            State::default(),
            Input::CardInserted {
                card: Card::Known("a".into()),
                now: 1,
            },
        );
        let (s, _) = run(
            s,
            Input::Login {
                at_keyboard: false,
                now: 1,
            },
        );
        let (s, _) = run(
            s,
            Input::SignInFinished {
                now: 2,
                result: Some(tok("A", 600)),
            },
        );
        // Another card's removal is not this session's signal.
        let (s, fx) = run(
            s,
            Input::CardRemoved {
                card: Card::Known("b".into()),
            },
        );
        assert!(notices(&fx).is_empty());
        let (s, fx) = run(
            s,
            Input::CardRemoved {
                card: Card::Known("a".into()),
            },
        );
        assert_eq!(
            notices(&fx),
            vec![Notice::Locked {
                reason: LockReason::CardRemoved
            }]
        );
        let (unlocked, fx) = run(
            s.clone(),
            Input::CardInserted {
                card: Card::Known("a".into()),
                now: 3,
            },
        );
        assert_eq!(notices(&fx), vec![Notice::Unlocked]);
        assert_eq!(unlocked.state(), SessionState::SignedIn);
        let (ended, fx) = run(
            s,
            Input::CardInserted {
                card: Card::Known("b".into()),
                now: 3,
            },
        );
        assert_eq!(ended.state(), SessionState::SignedOut);
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::EndAtProvider(t) if t.who == "A"))
        );
    }

    #[test]
    fn a_restore_keeps_the_lock_and_a_card_session_waits_for_its_card() {
        let s = signed_in_as("A", 1_000);
        let (s, fx) = run(
            s,
            Input::Lock {
                reason: LockReason::Workstation,
            },
        );
        let stored = fx.iter().rev().find_map(|e| match e {
            Effect::Save(snapshot) => Some(snapshot.clone()),
            _ => None,
        });
        assert_eq!(s.snapshot(), stored);
        let (restored, _) = run(State::default(), Input::Restore { stored, now: 1_010 });
        assert_eq!(restored.state(), SessionState::Locked);
        let carded = Snapshot {
            tokens: tok("A", 2_000),
            signed_in_at: 1_000,
            lock: None,
            card: Some(Card::Known("a".into())),
        };
        let (restored, _) = run(
            State::default(),
            Input::Restore {
                stored: Some(carded),
                now: 1_010,
            },
        );
        assert_eq!(restored.lock(), Some(&LockReason::Restarted));
        // Expired and not renewable: forgotten.
        let stale = Snapshot {
            tokens: Tok {
                renewable: false,
                ..tok("A", 1_000)
            },
            signed_in_at: 900,
            lock: None,
            card: None,
        };
        let (restored, fx) = run(
            State::default(),
            Input::Restore {
                stored: Some(stale),
                now: 1_010,
            },
        );
        assert_eq!(restored.state(), SessionState::SignedOut);
        assert_eq!(fx, vec![Effect::ClearStore]);
    }

    #[test]
    fn the_timers_lock_when_idle_announce_and_end_an_unrenewable_session_and_cap_its_length() {
        let r = rules();
        let s = signed_in_as("A", 1_000);
        let (s, fx) = run(
            s.clone(),
            Input::Tick {
                now: 1_000 + r.inactivity_secs - 1,
            },
        );
        assert!(fx.is_empty(), "{fx:?}");
        let (locked, _) = run(
            s.clone(),
            Input::Tick {
                now: 1_000 + r.inactivity_secs,
            },
        );
        assert_eq!(locked.state(), SessionState::Locked);
        let (ended, _) = run(
            s,
            Input::Tick {
                now: 1_000 + r.absolute_secs,
            },
        );
        assert_eq!(ended.state(), SessionState::SignedOut);

        let (s, _) = run(
            State::default(),
            Input::Login {
                at_keyboard: false,
                now: 0,
            },
        );
        let short = Tok {
            renewable: false,
            ..tok("B", 300)
        };
        let (s, _) = run(
            s,
            Input::SignInFinished {
                now: 0,
                result: Some(short),
            },
        );
        let (s, fx) = run(
            s,
            Input::Tick {
                now: 300 - r.expiring_notice_secs,
            },
        );
        assert_eq!(
            notices(&fx),
            vec![Notice::SessionExpiring { expires_at: 300 }]
        );
        assert!(s.needs_authentication(&r, 300 - r.expiring_notice_secs));
        let (s, fx) = run(s, Input::Tick { now: 250 });
        assert!(notices(&fx).is_empty(), "announced once");
        let (s, _) = run(s, Input::Tick { now: 300 });
        assert_eq!(s.state(), SessionState::SignedOut);
    }

    #[test]
    fn a_failed_refresh_backs_off_the_background_but_a_client_may_try_each_second() {
        let s = signed_in_as("A", 1_000);
        let (s, _) = run(
            s,
            Input::RefreshStarting {
                caller: Caller::Background,
                now: 1_500,
            },
        );
        let generation = s.generation;
        let (s, _) = run(
            s,
            Input::RefreshFinished {
                generation,
                now: 1_500,
                outcome: Refreshed::Failed {
                    error: "outage".into(),
                    jitter_percent: 100,
                },
            },
        );
        let (s, _) = run(
            s,
            Input::RefreshFinished {
                generation,
                now: 1_501,
                outcome: Refreshed::Failed {
                    error: "outage".into(),
                    jitter_percent: 100,
                },
            },
        );
        // Two failures: 2 s from the last.
        assert_eq!(s.active().map(|a| a.renewal.backoff_until), Some(1_503));
        let (s, fx) = run(
            s.clone(),
            Input::RefreshStarting {
                caller: Caller::Background,
                now: 1_502,
            },
        );
        assert_eq!(
            fx,
            vec![Effect::Refused(Refusal::RefreshNotDue { due_in: 1 })]
        );
        let (_, fx) = run(
            s,
            Input::RefreshStarting {
                caller: Caller::Client,
                now: 1_502,
            },
        );
        assert_eq!(fx, vec![Effect::CallProvider]);
    }
}
