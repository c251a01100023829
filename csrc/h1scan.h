/* h1scan: recognise one HTTP/1.1 message head of a deliberately narrow shape.
 *
 * The fast path of Pinion's HTTP/1 observer (agent/core/_http1fast.c) accounts requests
 * whose heads this scanner accepts and hands everything else to the llhttp-based Python
 * observer. So the scanner must accept only heads that llhttp (strict mode, as httptools
 * runs it) parses the same way, and it may decline anything: a decline costs speed, never
 * correctness. Accepted: "METHOD SP origin-form SP HTTP/1.1 CRLF" (GET POST PUT DELETE
 * OPTIONS PATCH; also HTTP/1.0, not chunked) or "HTTP/1.1 SP 200..599 SP reason CRLF" (204
 * and 304: no body), then header lines "token: value CRLF" without obs-fold, without a
 * Proxy-Connection or Upgrade header, with at most one Connection header, "keep-alive" or
 * "close" (`closes` says whether llhttp ends the connection after the message), with at most one of
 * "Content-Length: <digits>" and "Transfer-Encoding: chunked" (a response must have one:
 * without, its body runs to the close), then CRLF.
 * The whole head must be in the buffer and at most H1_MAX_HEAD bytes.
 * No allocation, no state: each call reads at most min(len, H1_MAX_HEAD) bytes. */
#ifndef PINION_H1SCAN_H
#define PINION_H1SCAN_H

#include <stddef.h>
#include <stdint.h>

#define H1_MAX_HEAD 8192
#define H1_MAX_CONTENT_LENGTH 999999999999999ULL /* 15 digits: far below llhttp's overflow */

enum h1_method { H1_GET = 0, H1_POST, H1_PUT, H1_DELETE, H1_OPTIONS, H1_PATCH, H1_METHODS };

typedef struct {
    size_t head_length;      /* bytes of the head, final CRLF CRLF included */
    uint64_t content_length; /* 0 when absent */
    int has_length;          /* Content-Length or chunked (a response needs one of them) */
    int chunked;             /* Transfer-Encoding: chunked (and no Content-Length) */
    int method;              /* requests: enum h1_method */
    int status;              /* responses: 200..599 */
    int keep_alive, close;   /* "Connection: keep-alive" / "Connection: close" seen */
    int closes;              /* llhttp's !should_keep_alive: no message may follow this one */
} h1_head;

/* 1: a whole head of the accepted shape starts at `data`, described in `out`; 0: not. */
int h1_scan_request(const uint8_t *data, size_t length, h1_head *out);
int h1_scan_response(const uint8_t *data, size_t length, h1_head *out);

extern const char *const h1_method_names[H1_METHODS];

/* Where a message body is: by Content-Length, or walking chunked framing (sizes in hex
 * digits only, at most H1_MAX_CHUNK_DIGITS, no extensions, no trailers: anything else is
 * left to llhttp). */
enum h1_body_state {
    H1_BODY_NONE = 0, /* between messages */
    H1_BODY_LENGTH,   /* `left` bytes to skip */
    H1_CHUNK_SIZE,    /* reading hex digits: `left` = value so far, `digits` of them */
    H1_CHUNK_SIZE_LF, /* the size line's CR seen */
    H1_CHUNK_DATA,    /* `left` bytes of chunk data to skip */
    H1_CHUNK_DATA_CR, /* the CRLF after chunk data */
    H1_CHUNK_DATA_LF,
    H1_CHUNK_LAST_CR, /* after "0 CRLF": the empty line (a trailer is not taken) */
    H1_CHUNK_LAST_LF,
};

#define H1_MAX_CHUNK_DIGITS 8

typedef struct {
    int state;
    int digits;
    uint64_t left;
} h1_body;

/* The body that follows `head` (H1_BODY_NONE when it has none). */
void h1_start_body(h1_body *body, const h1_head *head);

/* Walk the body from data[*pos], advancing *pos: 1 = the message ended at *pos, 0 = all of
 * data was body, -1 = data[*pos] is a byte this walker does not take (not consumed). */
int h1_walk_body(h1_body *body, const uint8_t *data, size_t length, size_t *pos);

/* The first request's Host as a metric label, exactly as agent.core.accounting.host_in finds
 * it in one relayed chunk: the leftmost match of
 *   CRLF [Hh][Oo][Ss][Tt] [ \t]* ":" [ \t]* ([!-~]{1,300}) [ \t]* CRLF
 * anywhere in data[0:length], lower-cased into out (H1_MAX_HOST bytes), and valid when it
 * fully matches agent.core.accounting._AUTHORITY (a host name or IPv4, or a bracketed IPv6,
 * with an optional :port of 1..5 digits). Returns the label's length, 0 for no label (no
 * such line, or its value is not a valid label: the caller looks again in the next chunk,
 * as the Python observer does). Reads only data[0:length]. */
#define H1_MAX_HOST 300
size_t h1_host_in(const uint8_t *data, size_t length, char out[H1_MAX_HOST]);

#endif
