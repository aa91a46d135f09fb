//! The model checker over [`step`] itself: every interleaving, up to the bounds below, of two
//! clinicians' sign-ins and hand-overs, refreshes and role changes that finish late, OS locks, a
//! smartcard taken out and put back (or another put in), inactivity and expiry (a driven clock),
//! logout, central sign-out, crash and restart, and three client connections whose `token` and
//! `whoami` answers are read from the state and delivered later, as the IPC server does.
//!
//! The model adds only what is outside the agent's state: the provider's answers (any of them, at any
//! later moment), the person at the reader, the store the `Save` effects write, the browser the
//! `OpenBrowser` effects open, and the connections. Its extra fields (`leaked`, `lock_missed`, ...) are
//! the properties' memory of what was decided, set by comparing the states before and after a step.

use super::*;
use stateright::{Checker, Model, Property};

const CLINICIANS: [&str; 2] = ["A", "B"];
const ROLES: [&str; 2] = ["nurse", "doctor"];
const CARDS: [&str; 2] = ["card-A", "card-B"];
/// The clock runs from 0 to this.
const LAST_SECOND: u64 = 3;
const CONNECTIONS: usize = 3;

const NO_LEAK: &str = "no token or identity of a clinician after their sign-out, lock or hand-over";
const ONE_BROWSER: &str = "at most one browser flow at a time";
const NO_REINSTATING: &str =
    "a late refresh or role change never reinstates an ended or changed session";
const LOCK_LOCKS: &str = "a lock ends in Locked";
const RESTORE_KEEPS_LOCK: &str = "restore after a crash never unlocks";

/// Where a model token came from: what the "never reinstated" property checks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Born {
    SignIn,
    /// A refresh begun in that generation.
    Refresh(u64),
    /// A role change begun in that generation.
    RoleChange(u64),
    /// Read back from the store after a restart.
    Restored,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Tok {
    who: usize,
    role: usize,
    born: Born,
    expires_at: u64,
}

impl Tokens for Tok {
    fn subject(&self) -> &str {
        CLINICIANS[self.who]
    }

    fn role(&self) -> Option<&str> {
        Some(ROLES[self.role])
    }

    fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// A's provider gives refresh tokens; B's session cannot be renewed and expires.
    fn renewable(&self) -> bool {
        self.who == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ask {
    Token,
    Whoami,
}

/// A client connection: idle, or holding an answer read from the state and not yet delivered. What
/// the answer was read from is kept as two facts, all the properties need (and few enough states):
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Conn {
    Idle,
    Answered {
        /// The agent's `epoch` is still the one it was read in (what the server checks before it
        /// writes an answer).
        current: bool,
        /// The session it was read from was ended, locked or handed over since.
        withdrawn: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct World {
    agent: State<Tok>,
    now: u64,
    stored: Option<Snapshot<Tok>>,
    browsers_open: u8,
    /// The refresh the provider is answering, begun in that generation.
    refreshing: Option<u64>,
    /// The card in the reader.
    card_in: Option<usize>,
    conns: [Conn; CONNECTIONS],
    leaked: bool,
    lock_missed: bool,
    restart_unlocked: bool,
    handed_over: bool,
    card_unlocked: bool,
    restored_locked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Action {
    Login {
        at_keyboard: bool,
    },
    ChangeRole,
    /// The browser flow ends: signed in as that clinician with that role, or failed.
    BrowserDone(Option<(usize, usize)>),
    Cancel,
    StartRefresh(Caller),
    RefreshDone(RefreshAnswer),
    OsLock,
    InsertCard(usize),
    RemoveCard,
    Activity,
    Tick,
    Logout,
    /// The relay reports a central sign-out for the current generation (`late`: for the one before).
    BackChannel {
        late: bool,
    },
    Read(usize, Ask),
    Deliver(usize),
    CrashAndRestart,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RefreshAnswer {
    /// New tokens, with the role switched or not.
    Renewed {
        role_switched: bool,
    },
    Ended,
    Failed,
}

struct SessionModel {
    rules: Rules,
}

fn rules() -> Rules {
    Rules {
        absolute_secs: 3,
        inactivity_secs: 2,
        inactivity_action: InactivityAction::Lock,
        expiring_notice_secs: 1,
        refresh_margin_secs: 1,
        on_card_removal: SignalAction::Lock,
        same_card_unlocks: true,
        allow_user_switch: true,
    }
}

fn card(n: usize) -> Card {
    Card::Known(CARDS[n].into())
}

/// Whose answers the state serves, and for which generation: signed in and not locked.
fn serving(agent: &State<Tok>) -> Option<(usize, u64)> {
    match &agent.session {
        Session::SignedIn(active) => Some((active.tokens.who, agent.generation)),
        _ => None,
    }
}

impl World {
    /// Feeds one input to the agent's own `step` and carries out what the model needs of its effects.
    fn apply(&mut self, rules: &Rules, input: Input<Tok>) -> Vec<Effect<Tok>> {
        let before = self.agent.clone();
        let (agent, effects) = step(rules, before.clone(), input);
        self.agent = agent;
        for effect in &effects {
            match effect {
                Effect::Save(snapshot) => self.stored = Some(snapshot.clone()),
                Effect::ClearStore => self.stored = None,
                Effect::OpenBrowser(_) => self.browsers_open += 1,
                Effect::AbortFlight => self.browsers_open = self.browsers_open.saturating_sub(1),
                _ => {}
            }
        }
        // An answer read for a session that is no longer served as it was is withdrawn: the sign-out,
        // lock or hand-over has been decided.
        let changed_hands = serving(&before) != serving(&self.agent);
        let new_epoch = before.epoch != self.agent.epoch;
        for conn in &mut self.conns {
            if let Conn::Answered { current, withdrawn } = conn {
                *withdrawn |= changed_hands;
                *current &= !new_epoch;
            }
        }
        // The agent never reads this counter (the async shell does): it would only multiply states.
        self.agent.installs = 0;
        effects
    }
}

impl Model for SessionModel {
    type State = World;
    type Action = Action;

    fn init_states(&self) -> Vec<World> {
        vec![World {
            agent: State::default(),
            now: 0,
            stored: None,
            browsers_open: 0,
            refreshing: None,
            card_in: None,
            conns: [Conn::Idle, Conn::Idle, Conn::Idle],
            leaked: false,
            lock_missed: false,
            restart_unlocked: false,
            handed_over: false,
            card_unlocked: false,
            restored_locked: false,
        }]
    }

    fn actions(&self, w: &World, actions: &mut Vec<Action>) {
        actions.push(Action::Login { at_keyboard: false });
        actions.push(Action::Login { at_keyboard: true });
        actions.push(Action::ChangeRole);
        if w.agent.flight.is_some() {
            actions.push(Action::BrowserDone(None));
            for who in 0..CLINICIANS.len() {
                for role in 0..ROLES.len() {
                    actions.push(Action::BrowserDone(Some((who, role))));
                }
            }
            actions.push(Action::Cancel);
        }
        match w.refreshing {
            None => {
                actions.push(Action::StartRefresh(Caller::Client));
                actions.push(Action::StartRefresh(Caller::Background));
            }
            Some(_) => {
                actions.push(Action::RefreshDone(RefreshAnswer::Renewed {
                    role_switched: false,
                }));
                actions.push(Action::RefreshDone(RefreshAnswer::Renewed {
                    role_switched: true,
                }));
                actions.push(Action::RefreshDone(RefreshAnswer::Ended));
                actions.push(Action::RefreshDone(RefreshAnswer::Failed));
            }
        }
        actions.push(Action::OsLock);
        match w.card_in {
            None => (0..CARDS.len()).for_each(|c| actions.push(Action::InsertCard(c))),
            Some(_) => actions.push(Action::RemoveCard),
        }
        actions.push(Action::Activity);
        if w.now < LAST_SECOND {
            actions.push(Action::Tick);
        }
        actions.push(Action::Logout);
        actions.push(Action::BackChannel { late: false });
        actions.push(Action::BackChannel { late: true });
        for (n, conn) in w.conns.iter().enumerate() {
            match conn {
                Conn::Idle => {
                    actions.push(Action::Read(n, Ask::Token));
                    actions.push(Action::Read(n, Ask::Whoami));
                }
                Conn::Answered { .. } => actions.push(Action::Deliver(n)),
            }
        }
        actions.push(Action::CrashAndRestart);
    }

    fn next_state(&self, last: &World, action: Action) -> Option<World> {
        let rules = &self.rules;
        let mut w = last.clone();
        let now = w.now;
        match action {
            Action::Login { at_keyboard } => {
                w.apply(rules, Input::Login { at_keyboard, now });
            }
            Action::ChangeRole => {
                w.apply(rules, Input::ChangeRole);
            }
            Action::BrowserDone(result) => {
                let flight = w.agent.flight.clone()?;
                w.browsers_open = w.browsers_open.saturating_sub(1);
                let before = w.agent.active().map(|a| a.tokens.who);
                let born = match flight.kind {
                    FlightKind::SignIn => Born::SignIn,
                    FlightKind::ChangeRole => Born::RoleChange(flight.generation),
                };
                let result = result.map(|(who, role)| Tok {
                    who,
                    role,
                    born,
                    expires_at: now + 2,
                });
                w.apply(
                    rules,
                    match flight.kind {
                        FlightKind::SignIn => Input::SignInFinished { now, result },
                        FlightKind::ChangeRole => Input::RoleChangeFinished { now, result },
                    },
                );
                let after = w.agent.active().map(|a| a.tokens.who);
                if before.is_some() && after.is_some() && before != after {
                    w.handed_over = true;
                }
            }
            Action::Cancel => {
                w.apply(rules, Input::CancelFlight);
            }
            Action::StartRefresh(caller) => {
                let effects = w.apply(rules, Input::RefreshStarting { caller, now });
                if effects.contains(&Effect::CallProvider) {
                    w.refreshing = Some(w.agent.generation);
                }
            }
            Action::RefreshDone(answer) => {
                let generation = w.refreshing.take()?;
                // The provider answers for the session the refresh was sent with.
                let sent = w.agent.active().map(|a| (a.tokens.who, a.tokens.role));
                let (who, role) = sent.unwrap_or((0, 0));
                let outcome = match answer {
                    RefreshAnswer::Renewed { role_switched } => Refreshed::Renewed(Tok {
                        who,
                        role: if role_switched { 1 - role } else { role },
                        born: Born::Refresh(generation),
                        expires_at: now + 2,
                    }),
                    RefreshAnswer::Ended => Refreshed::Ended("refused".into()),
                    RefreshAnswer::Failed => Refreshed::Failed {
                        error: "outage".into(),
                        jitter_percent: 100,
                    },
                };
                w.apply(
                    rules,
                    Input::RefreshFinished {
                        generation,
                        now,
                        outcome,
                    },
                );
            }
            Action::OsLock => {
                let was_signed_in = matches!(w.agent.session, Session::SignedIn(_));
                w.apply(
                    rules,
                    Input::Lock {
                        reason: LockReason::Workstation,
                    },
                );
                if was_signed_in && !matches!(w.agent.session, Session::Locked(..)) {
                    w.lock_missed = true;
                }
            }
            Action::InsertCard(c) => {
                w.card_in = Some(c);
                let was_locked = matches!(w.agent.session, Session::Locked(..));
                w.apply(rules, Input::CardInserted { card: card(c), now });
                if was_locked && matches!(w.agent.session, Session::SignedIn(_)) {
                    w.card_unlocked = true;
                }
            }
            Action::RemoveCard => {
                let c = w.card_in.take()?;
                let bound = matches!(&w.agent.session,
                    Session::SignedIn(a) if a.card == Some(card(c)));
                w.apply(rules, Input::CardRemoved { card: card(c) });
                if bound && !matches!(w.agent.session, Session::Locked(..)) {
                    w.lock_missed = true;
                }
            }
            Action::Activity => {
                w.apply(rules, Input::Activity { now });
            }
            Action::Tick => {
                w.now += 1;
                let now = w.now;
                let idle = match &w.agent.session {
                    Session::SignedIn(a) => now >= a.last_activity + rules.inactivity_secs,
                    _ => false,
                };
                w.apply(rules, Input::Tick { now });
                if idle && matches!(w.agent.session, Session::SignedIn(_)) {
                    w.lock_missed = true;
                }
            }
            Action::Logout => {
                w.apply(
                    rules,
                    Input::Logout {
                        reason: "signed out".into(),
                    },
                );
            }
            Action::BackChannel { late } => {
                let generation = if late {
                    w.agent.generation.checked_sub(1)?
                } else {
                    w.agent.generation
                };
                w.apply(
                    rules,
                    Input::EndedElsewhere {
                        generation,
                        reason: "ended centrally".into(),
                    },
                );
            }
            Action::Read(n, ask) => {
                let answer = match ask {
                    Ask::Whoami => w.agent.unlocked().ok(),
                    Ask::Token => w.agent.cached_token(rules, now, 0, false).ok().flatten(),
                };
                if let Some(active) = answer {
                    // An answer is only ever read from a session that is signed in and unlocked.
                    if serving(&w.agent).map(|(serving, _)| serving) != Some(active.tokens.who) {
                        w.leaked = true;
                    }
                    w.conns[n] = Conn::Answered {
                        current: true,
                        withdrawn: false,
                    };
                }
            }
            Action::Deliver(n) => {
                let Conn::Answered { current, withdrawn } = w.conns[n] else {
                    return None;
                };
                // The server writes the answer only if the epoch is still the one it was read in.
                if current && withdrawn {
                    w.leaked = true;
                }
                w.conns[n] = Conn::Idle;
            }
            Action::CrashAndRestart => {
                let was_locked = matches!(w.agent.session, Session::Locked(..));
                // The process dies with its flows, refreshes and connections; the store stays,
                // and so does the card in the reader, which the watcher reports at start.
                let stored = w.stored.clone().map(|mut s| {
                    s.tokens.born = Born::Restored;
                    s
                });
                w.agent = State::default();
                w.browsers_open = 0;
                w.refreshing = None;
                w.conns = [Conn::Idle, Conn::Idle, Conn::Idle];
                w.apply(rules, Input::Restore { stored, now });
                if let Some(c) = w.card_in {
                    w.apply(rules, Input::CardInserted { card: card(c), now });
                }
                if was_locked && matches!(w.agent.session, Session::SignedIn(_)) {
                    w.restart_unlocked = true;
                }
                w.restored_locked |= was_locked && matches!(w.agent.session, Session::Locked(..));
            }
        }
        // The connections are alike: which one holds which answer does not matter (symmetry).
        w.conns.sort();
        Some(w)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(NO_LEAK, |_, w: &World| !w.leaked),
            Property::always(ONE_BROWSER, |_, w: &World| w.browsers_open <= 1),
            Property::always(NO_REINSTATING, |_, w: &World| {
                match w.agent.active().map(|a| a.tokens.born.clone()) {
                    Some(Born::Refresh(g)) => g == w.agent.generation,
                    Some(Born::RoleChange(g)) => g + 1 == w.agent.generation,
                    _ => true,
                }
            }),
            Property::always(LOCK_LOCKS, |_, w: &World| !w.lock_missed),
            Property::always(RESTORE_KEEPS_LOCK, |_, w: &World| !w.restart_unlocked),
            // The model reaches what the properties are about.
            Property::sometimes("a hand-over", |_, w: &World| w.handed_over),
            Property::sometimes("the same card back unlocks", |_, w: &World| w.card_unlocked),
            Property::sometimes("restored locked", |_, w: &World| w.restored_locked),
            Property::sometimes(
                "a refreshed token installed while locked",
                |_, w: &World| matches!(&w.agent.session, Session::Locked(a, _) if matches!(a.tokens.born, Born::Refresh(_))),
            ),
        ]
    }

    /// The counters grow with every sign-in, lock and failed refresh: bounded, as the clock is.
    fn within_boundary(&self, w: &World) -> bool {
        w.agent.generation <= 4
            && w.agent.epoch <= 6
            && w.agent.active().is_none_or(|a| a.renewal.backoff_step <= 1)
    }
}

/// Every interleaving of this many steps is explored.
const DEPTH: usize = 12;

/// The `always` properties: a discovery of one is a counterexample.
const RULES: [&str; 5] = [
    NO_LEAK,
    ONE_BROWSER,
    NO_REINSTATING,
    LOCK_LOCKS,
    RESTORE_KEEPS_LOCK,
];

#[test]
fn the_session_rules_hold_in_every_interleaving() {
    // CIS2_MODEL_THREADS=1 gives the shortest counterexample.
    let threads = std::env::var("CIS2_MODEL_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let started = std::time::Instant::now();
    let checker = SessionModel { rules: rules() }
        .checker()
        .threads(threads)
        .target_max_depth(DEPTH)
        .spawn_bfs()
        .join();
    println!(
        "session model: {} states ({} unique) up to depth {}, in {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    for name in RULES {
        if let Some(path) = checker.discovery(name) {
            println!("counterexample to \"{name}\":\n{path}");
        }
    }
    checker.assert_properties();
    // A model that stopped early would check little.
    assert!(checker.unique_state_count() > 100_000);
    assert_eq!(checker.max_depth(), DEPTH);
}
