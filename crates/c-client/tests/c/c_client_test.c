/* The C library from C, as an EHR calls it: built with gcc (Linux) or x86_64-w64-mingw32-gcc (Windows,
 * run under Wine) against libcis2_client / cis2_client.dll, and run against a sandbox cis2-agentd.
 *
 *   c_client_test SCENARIO ENDPOINT
 *
 * SCENARIO: no-agent, signed-out, sign-in-failed, full, locked, denied, allowed. What the harness must
 * arrange for each (the agent's config, the scripted browser) is in crates/c-client/tests/languages.rs
 * and scripts/windows/c-client.sh. Commands the program runs at set points, from the environment:
 * CIS2_TEST_LOGOUT_CMD (signs out, as another program), CIS2_TEST_LOCK_CMD (locks the workstation),
 * CIS2_TEST_STOP_AGENT_CMD (stops the agent), CIS2_TEST_SELF (this program's path as the agent sees it).
 * Prints "ok - ..." / "FAIL - ..." per check and "c-client: N passed, M failed"; exits 1 on a failure.
 * Never prints a token. */
#include "cis2_client.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <windows.h>
typedef CRITICAL_SECTION lock_t;
typedef CONDITION_VARIABLE cond_t;
#define lock_init(l) InitializeCriticalSection(l)
#define lock_take(l) EnterCriticalSection(l)
#define lock_give(l) LeaveCriticalSection(l)
#define cond_init(c) InitializeConditionVariable(c)
#define cond_wake(c) WakeAllConditionVariable(c)
/* Waits at most a second; the caller loops until its deadline. */
#define cond_wait_1s(c, l) SleepConditionVariableCS(c, l, 1000)
typedef HANDLE thread_t;
#define THREAD_FN DWORD WINAPI
#define thread_start(t, fn, arg) (*(t) = CreateThread(NULL, 0, fn, arg, 0, NULL))
#define thread_join(t) (WaitForSingleObject(t, INFINITE), CloseHandle(t))
#else
#include <pthread.h>
#include <time.h>
typedef pthread_mutex_t lock_t;
typedef pthread_cond_t cond_t;
#define lock_init(l) pthread_mutex_init(l, NULL)
#define lock_take(l) pthread_mutex_lock(l)
#define lock_give(l) pthread_mutex_unlock(l)
#define cond_init(c) pthread_cond_init(c, NULL)
#define cond_wake(c) pthread_cond_broadcast(c)
static void cond_wait_1s(cond_t *c, lock_t *l) {
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += 1;
  pthread_cond_timedwait(c, l, &until);
}
typedef pthread_t thread_t;
#define THREAD_FN void *
#define thread_start(t, fn, arg) pthread_create(t, NULL, fn, arg)
#define thread_join(t) pthread_join(t, NULL)
#endif

static int passed, failed;

static void check(int ok, const char *what, int rc) {
  if (ok) {
    printf("ok - %s\n", what);
    passed++;
  } else {
    printf("FAIL - %s (rc %d, last error: %s)\n", what, rc, cis2_last_error());
    failed++;
  }
  fflush(stdout);
}

/* Runs the harness's command in `variable`; 0 when it is not set (the step is then skipped and says so). */
static int run(const char *variable) {
  const char *command = getenv(variable);
  if (command == NULL) {
    printf("skip - %s is not set: the checks after it are skipped\n", variable);
    return 0;
  }
  int status = system(command);
  check(status == 0, variable, status);
  return status == 0;
}

/* ---- events: the callback records each event's type; the test waits for one by name ---- */
#define MAX_EVENTS 64
static lock_t events_lock;
static cond_t events_cond;
static char events[MAX_EVENTS][64];
static int event_count;
static void *callback_user_seen;

static void on_event(const char *event_json, void *user) {
  const char *type = strstr(event_json, "\"type\":\"");
  lock_take(&events_lock);
  callback_user_seen = user;
  if (type != NULL && event_count < MAX_EVENTS) {
    type += strlen("\"type\":\"");
    size_t n = strcspn(type, "\"");
    if (n > 63) n = 63;
    memcpy(events[event_count], type, n);
    events[event_count][n] = 0;
    event_count++;
  }
  cond_wake(&events_cond);
  lock_give(&events_lock);
}

/* Waits (up to 60 s: a loaded machine) for an event of `type` after the first `from` events. */
static int wait_event(const char *type, int from) {
  int found = 0;
  lock_take(&events_lock);
  for (int waited = 0; waited < 60 && !found; waited++) {
    for (int i = from; i < event_count; i++)
      if (strcmp(events[i], type) == 0) found = 1;
    if (!found) cond_wait_1s(&events_cond, &events_lock);
  }
  lock_give(&events_lock);
  return found;
}

static int events_so_far(void) {
  lock_take(&events_lock);
  int n = event_count;
  lock_give(&events_lock);
  return n;
}

static int contains(const char *text, const char *part) { return strstr(text, part) != NULL; }

/* ---- several threads on one handle ---- */
struct worker {
  cis2_client *client;
  const char *token;
  int failures;
};

static THREAD_FN worker_main(void *arg) {
  struct worker *w = arg;
  char buf[8192];
  size_t used;
  for (int i = 0; i < 20; i++) {
    if (cis2_get_token_no_auth(w->client, 0, buf, sizeof buf, &used) != CIS2_OK || strcmp(buf, w->token) != 0)
      w->failures++;
    if (cis2_whoami_json(w->client, buf, sizeof buf, &used) != CIS2_OK || !contains(buf, "555021935107"))
      w->failures++;
  }
  return 0;
}

static char buf[65536];
static char token[65536];
static uint16_t wide[65536];

static void scenario_no_agent(const char *endpoint) {
  cis2_client *c = cis2_open(endpoint);
  check(c == NULL, "cis2_open with no agent there returns NULL", 0);
  check(contains(cis2_last_error(), endpoint), "and cis2_last_error names where it looked", 0);
  check(strlen(cis2_version()) > 0, "cis2_version is set", 0);
  cis2_close(NULL);
  size_t used = 99;
  int rc = cis2_status_json(NULL, buf, sizeof buf, &used);
  check(rc == CIS2_E_BAD_ARGUMENT && used == 0, "a NULL handle is CIS2_E_BAD_ARGUMENT", rc);
  check(contains(cis2_last_error(), "cis2_open"), "and the error says what to pass", rc);
}

static void scenario_signed_out(const char *endpoint) {
  cis2_client *c = cis2_open(endpoint);
  check(c != NULL, "cis2_open", 0);
  if (c == NULL) return;
  size_t used = 0;
  int rc = cis2_status_json(c, buf, sizeof buf, &used);
  check(rc == CIS2_OK && contains(buf, "\"state\":\"signed_out\""), "status: signed out", rc);
  check(contains(buf, "\"environment\":\"sandbox\""), "status: sandbox", rc);
  check(used == strlen(buf) + 1, "*used is the length with its NUL", rc);
  size_t needed = used;

  rc = cis2_status_json(c, NULL, 0, &used);
  check(rc == CIS2_E_BUFFER_TOO_SMALL && used == needed, "NULL, 0 asks for the size", rc);
  char small[8] = "garbage";
  rc = cis2_status_json(c, small, sizeof small, &used);
  check(rc == CIS2_E_BUFFER_TOO_SMALL && used == needed && small[0] == 0,
        "too small: CIS2_E_BUFFER_TOO_SMALL, *used set, buf left empty", rc);
  check(contains(cis2_last_error(), "needs"), "and the error says how much it needs", rc);
  char *exact = malloc(needed);
  rc = cis2_status_json(c, exact, needed, &used);
  check(rc == CIS2_OK && strlen(exact) + 1 == needed, "a buffer of exactly *used bytes is enough", rc);
  free(exact);
  rc = cis2_status_json(c, NULL, 10, &used);
  check(rc == CIS2_E_BAD_ARGUMENT, "NULL with a capacity is CIS2_E_BAD_ARGUMENT", rc);

  rc = cis2_whoami_json(c, buf, sizeof buf, &used);
  check(rc == CIS2_E_NOT_SIGNED_IN && used == 0, "whoami: CIS2_E_NOT_SIGNED_IN", rc);
  check(strlen(cis2_last_error()) > 10, "with a sentence in cis2_last_error", rc);
  rc = cis2_get_token_no_auth(c, 60, buf, sizeof buf, &used);
  check(rc == CIS2_E_NOT_SIGNED_IN, "get_token_no_auth: CIS2_E_NOT_SIGNED_IN, no browser", rc);
  rc = cis2_whoami_json_w(c, wide, 65536, &used);
  check(rc == CIS2_E_NOT_SIGNED_IN, "whoami_json_w: CIS2_E_NOT_SIGNED_IN", rc);
  rc = cis2_status_json(c, buf, sizeof buf, &used);
  check(rc == CIS2_OK && strcmp(cis2_last_error(), "") == 0, "a call that succeeds clears the last error", rc);
  cis2_close(c);

  /* NULL: $CIS2_AGENT_SOCK (the harness sets it to the same agent). */
  c = cis2_open(NULL);
  check(c != NULL, "cis2_open(NULL) finds the agent through CIS2_AGENT_SOCK", 0);
  cis2_close(c);
}

static void scenario_sign_in_failed(const char *endpoint) {
  cis2_client *c = cis2_open(endpoint);
  check(c != NULL, "cis2_open", 0);
  if (c == NULL) return;
  size_t used;
  int rc = cis2_get_token(c, 60, buf, sizeof buf, &used);
  check(rc == CIS2_E_SIGN_IN_FAILED, "get_token when the person cancels: CIS2_E_SIGN_IN_FAILED", rc);
  check(contains(cis2_last_error(), "cancel"), "and the error says it was cancelled", rc);
  cis2_close(c);
}

static void scenario_full(const char *endpoint) {
  cis2_client *c = cis2_open(endpoint);
  check(c != NULL, "cis2_open", 0);
  if (c == NULL) return;
  int marker = 0;
  int rc = cis2_subscribe(c, on_event, &marker);
  check(rc == CIS2_OK, "cis2_subscribe", rc);

  size_t used = 0;
  rc = cis2_get_token(c, 60, token, sizeof token, &used);
  check(rc == CIS2_OK && strlen(token) > 20 && used == strlen(token) + 1, "get_token signs in and answers", rc);
  printf("# token: %u characters\n", (unsigned)strlen(token));
  check(wait_event("signed_in", 0), "signed_in event received", 0);
  lock_take(&events_lock);
  check(callback_user_seen == &marker, "the callback gets the user pointer", 0);
  lock_give(&events_lock);

  rc = cis2_whoami_json(c, buf, sizeof buf, &used);
  check(rc == CIS2_OK && contains(buf, "\"uid\":\"555021935107\"") && contains(buf, "\"selected_role\":{"),
        "whoami: the user and the selected role", rc);
  size_t whoami_len = strlen(buf);

  size_t needed = 0;
  rc = cis2_get_token_no_auth(c, 60, NULL, 0, &needed);
  check(rc == CIS2_E_BUFFER_TOO_SMALL && needed == strlen(token) + 1, "token size query", rc);
  char *exact = malloc(needed);
  rc = cis2_get_token_no_auth(c, 60, exact, needed, &used);
  check(rc == CIS2_OK && strcmp(exact, token) == 0, "get_token_no_auth gives the same token", rc);
  free(exact);

  rc = cis2_whoami_json_w(c, wide, 65536, &used);
  int same = rc == CIS2_OK && used == whoami_len + 1;
  for (size_t i = 0; same && i < whoami_len; i++) same = wide[i] == (uint16_t)(unsigned char)buf[i];
  check(same && wide[whoami_len] == 0, "whoami_json_w: the same JSON in UTF-16 units", rc);
  rc = cis2_whoami_json_w(c, wide, 3, &used);
  check(rc == CIS2_E_BUFFER_TOO_SMALL && used == whoami_len + 1 && wide[0] == 0, "whoami_json_w too small", rc);
  rc = cis2_get_token_w(c, 60, wide, 65536, &used);
  same = rc == CIS2_OK && used == strlen(token) + 1;
  for (size_t i = 0; same && i < strlen(token); i++) same = wide[i] == (uint16_t)token[i];
  check(same, "get_token_w: the same token in UTF-16 units", rc);

  rc = cis2_get_token_no_auth(c, 100000, buf, sizeof buf, &used);
  check(rc == CIS2_E_BAD_ARGUMENT && contains(cis2_last_error(), "86400"),
        "min_valid_secs too large: CIS2_E_BAD_ARGUMENT naming the limit", rc);

  struct worker workers[8];
  thread_t threads[8];
  for (int i = 0; i < 8; i++) {
    workers[i].client = c;
    workers[i].token = token;
    workers[i].failures = 0;
    thread_start(&threads[i], worker_main, &workers[i]);
  }
  int failures = 0;
  for (int i = 0; i < 8; i++) {
    thread_join(threads[i]);
    failures += workers[i].failures;
  }
  check(failures == 0, "8 threads x 40 calls on one handle all succeed", failures);

  int before = events_so_far();
  if (run("CIS2_TEST_LOGOUT_CMD")) {
    check(wait_event("signed_out", before), "signed_out event received", 0);
    rc = cis2_get_token_no_auth(c, 0, buf, sizeof buf, &used);
    check(rc == CIS2_E_NOT_SIGNED_IN, "after the sign-out: CIS2_E_NOT_SIGNED_IN", rc);
  }

  before = events_so_far();
  if (run("CIS2_TEST_STOP_AGENT_CMD")) {
    check(wait_event("disconnected", before), "the agent stopped: a disconnected event", 0);
    rc = cis2_status_json(c, buf, sizeof buf, &used);
    check(rc == CIS2_E_NO_AGENT, "then calls answer CIS2_E_NO_AGENT", rc);
  }
  cis2_close(c);
}

static void scenario_locked(const char *endpoint) {
  cis2_client *c = cis2_open(endpoint);
  check(c != NULL, "cis2_open", 0);
  if (c == NULL) return;
  int rc = cis2_subscribe(c, on_event, NULL);
  check(rc == CIS2_OK, "cis2_subscribe", rc);
  size_t used;
  rc = cis2_get_token(c, 60, token, sizeof token, &used);
  check(rc == CIS2_OK, "get_token signs in", rc);
  int before = events_so_far();
  if (!run("CIS2_TEST_LOCK_CMD")) {
    cis2_close(c);
    return;
  }
  check(wait_event("locked", before), "locked event received", 0);
  rc = cis2_status_json(c, buf, sizeof buf, &used);
  check(rc == CIS2_OK && contains(buf, "\"state\":\"locked\""), "status: locked", rc);
  rc = cis2_whoami_json(c, buf, sizeof buf, &used);
  check(rc == CIS2_E_LOCKED, "whoami: CIS2_E_LOCKED", rc);
  rc = cis2_get_token_no_auth(c, 0, buf, sizeof buf, &used);
  check(rc == CIS2_E_LOCKED, "get_token_no_auth: CIS2_E_LOCKED", rc);
  before = events_so_far();
  rc = cis2_get_token(c, 0, buf, sizeof buf, &used);
  check(rc == CIS2_OK, "get_token signs the same clinician in again", rc);
  check(wait_event("unlocked", before), "unlocked event received", 0);
  rc = cis2_subscribe(c, NULL, NULL);
  check(rc == CIS2_OK, "cis2_subscribe(NULL) stops the events", rc);
  cis2_close(c);
}

static void scenario_denied(const char *endpoint) {
  cis2_client *c = cis2_open(endpoint);
  check(c != NULL, "cis2_open", 0);
  if (c == NULL) return;
  size_t used;
  int rc = cis2_status_json(c, buf, sizeof buf, &used);
  check(rc == CIS2_OK, "status is answered for every program", rc);
  rc = cis2_whoami_json(c, buf, sizeof buf, &used);
  check(rc == CIS2_E_NOT_ALLOWED, "whoami: CIS2_E_NOT_ALLOWED", rc);
  const char *self = getenv("CIS2_TEST_SELF");
  check(self != NULL && contains(cis2_last_error(), self), "the refusal names this program's own executable", rc);
  rc = cis2_get_token(c, 0, buf, sizeof buf, &used);
  check(rc == CIS2_E_NOT_ALLOWED, "get_token: CIS2_E_NOT_ALLOWED (no sign-in started)", rc);
  rc = cis2_subscribe(c, on_event, NULL);
  check(rc == CIS2_E_NOT_ALLOWED, "cis2_subscribe: CIS2_E_NOT_ALLOWED", rc);
  cis2_close(c);
}

static void scenario_allowed(const char *endpoint) {
  cis2_client *c = cis2_open(endpoint);
  check(c != NULL, "cis2_open", 0);
  if (c == NULL) return;
  size_t used;
  int rc = cis2_get_token(c, 0, token, sizeof token, &used);
  check(rc == CIS2_OK, "listed by path in [[clients]]: get_token signs in", rc);
  rc = cis2_whoami_json(c, buf, sizeof buf, &used);
  check(rc == CIS2_OK, "and whoami answers", rc);
  cis2_close(c);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s SCENARIO ENDPOINT\n", argv[0]);
    return 2;
  }
  lock_init(&events_lock);
  cond_init(&events_cond);
  const char *scenario = argv[1], *endpoint = argv[2];
  if (strcmp(scenario, "no-agent") == 0) scenario_no_agent(endpoint);
  else if (strcmp(scenario, "signed-out") == 0) scenario_signed_out(endpoint);
  else if (strcmp(scenario, "sign-in-failed") == 0) scenario_sign_in_failed(endpoint);
  else if (strcmp(scenario, "full") == 0) scenario_full(endpoint);
  else if (strcmp(scenario, "locked") == 0) scenario_locked(endpoint);
  else if (strcmp(scenario, "denied") == 0) scenario_denied(endpoint);
  else if (strcmp(scenario, "allowed") == 0) scenario_allowed(endpoint);
  else {
    fprintf(stderr, "unknown scenario %s\n", scenario);
    return 2;
  }
  printf("c-client %s: %d passed, %d failed\n", scenario, passed, failed);
  return failed == 0 && passed > 0 ? 0 : 1;
}
