/*
 * fhirbox console: the session, the one place that holds the page's shared mutable state: the
 * signed-in subject's credentials (a module variable only: no cookie, no localStorage) and
 * the generation counter, which changes at each sign-in and sign-out so that answers to an
 * earlier session's requests are dropped instead of painted over the new session. The
 * current route is read from the location hash. Other modules read all this through the
 * functions below; only sign-in and sign-out change it.
 */

export const ROUTES = ['jobs', 'data', 'sql', 'views', 'health'];

const session = { auth: null, who: '', generation: 0 };

/** The `Authorization` header value of the signed-in subject, or null. */
export const authorization = () => session.auth;
export const signedIn = () => Boolean(session.auth);
/** The signed-in subject, as shown in the top bar (`root` or `Client/<id>`). */
export const subject = () => session.who;
export const generation = () => session.generation;

export function beginSession(auth, who) {
  session.auth = auth;
  session.who = who;
  session.generation += 1;
}

export function endSession() {
  session.auth = null;
  session.who = '';
  session.generation += 1;
}

/** The page named by the location hash (`#/jobs` etc.), or null. */
export function currentRoute() {
  const name = window.location.hash.replace(/^#\/?/, '');
  return ROUTES.includes(name) ? name : null;
}
