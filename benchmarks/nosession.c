/* LD_PRELOAD shim: every TLS connection wrk makes is a full handshake.
 *
 * wrk reuses one SSL object per connection slot and calls SSL_clear() between
 * connections; SSL_clear() keeps the session, so each reconnect resumes it (a
 * cheap PSK handshake). Dropping the session right after SSL_clear() makes the
 * next SSL_connect() a full ECDHE + ECDSA handshake. Built by benchmarks/run.py
 * into benchmarks/.cache/nosession.so; needs no OpenSSL headers.
 */
#define _GNU_SOURCE
#include <dlfcn.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;

int SSL_clear(SSL *ssl) {
    static int (*real_clear)(SSL *);
    static int (*set_session)(SSL *, SSL_SESSION *);
    if (!real_clear) {
        real_clear = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
        set_session = (int (*)(SSL *, SSL_SESSION *))dlsym(RTLD_NEXT, "SSL_set_session");
    }
    int rc = real_clear(ssl);
    set_session(ssl, 0);
    return rc;
}
