/* pinion-cni's pure part (see cnicore.h): JSON in, Python-formatted text out, decisions. */
#include "cnicore.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "printable.h"

/* ---------------------------------------------------------------- buffers */

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->failed) return;
    if (extra > SIZE_MAX / 2 - b->len) { b->failed = 1; return; }
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    char *data = realloc(b->data, cap);
    if (data == NULL) { b->failed = 1; return; }
    b->data = data;
    b->cap = cap;
}

void buf_put(struct buf *b, const void *bytes, size_t n) {
    buf_reserve(b, n);
    if (b->failed || n == 0) return;
    memcpy(b->data + b->len, bytes, n);
    b->len += n;
}

void buf_puts(struct buf *b, const char *text) { buf_put(b, text, strlen(text)); }

void buf_putc(struct buf *b, char c) { buf_put(b, &c, 1); }

void buf_printf(struct buf *b, const char *format, ...) {
    char small[256];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(small, sizeof small, format, args);
    va_end(args);
    if (n < 0) { b->failed = 1; return; }
    if ((size_t)n < sizeof small) { buf_put(b, small, (size_t)n); return; }
    buf_reserve(b, (size_t)n);
    if (b->failed) return;
    va_start(args, format);
    vsnprintf(b->data + b->len, (size_t)n + 1, format, args);
    va_end(args);
    b->len += (size_t)n;
}

void buf_free(struct buf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

const char *buf_cstr(struct buf *b) {
    buf_reserve(b, 0);
    if (b->failed || b->data == NULL) return "";
    b->data[b->len] = '\0';
    return b->data;
}

/* ---------------------------------------------------------------- UTF-8 / WTF-8 */

/* Length of a well-formed UTF-8 sequence at s (strict: no overlong forms, no surrogates,
 * nothing past U+10FFFF), or 0. With `surrogates`, the 3-byte forms of U+D800-U+DFFF pass
 * (WTF-8, our own strings only). */
static size_t utf8_sequence(const unsigned char *s, size_t n, int surrogates, uint32_t *code) {
    if (n == 0) return 0;
    unsigned char c = s[0];
    if (c < 0x80) { *code = c; return 1; }
    if (c >= 0xC2 && c <= 0xDF) {
        if (n < 2 || (s[1] & 0xC0) != 0x80) return 0;
        *code = ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
        return 2;
    }
    if (c >= 0xE0 && c <= 0xEF) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        uint32_t v = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        if (v < 0x800 || (!surrogates && v >= 0xD800 && v <= 0xDFFF)) return 0;
        *code = v;
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        uint32_t v = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
                     ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        if (v < 0x10000 || v > 0x10FFFF) return 0;
        *code = v;
        return 4;
    }
    return 0;
}

static void put_code_point(struct buf *out, uint32_t code) {
    unsigned char bytes[4];
    size_t n;
    if (code < 0x80) { bytes[0] = (unsigned char)code; n = 1; }
    else if (code < 0x800) {
        bytes[0] = (unsigned char)(0xC0 | (code >> 6));
        bytes[1] = (unsigned char)(0x80 | (code & 0x3F));
        n = 2;
    } else if (code < 0x10000) {
        bytes[0] = (unsigned char)(0xE0 | (code >> 12));
        bytes[1] = (unsigned char)(0x80 | ((code >> 6) & 0x3F));
        bytes[2] = (unsigned char)(0x80 | (code & 0x3F));
        n = 3;
    } else {
        bytes[0] = (unsigned char)(0xF0 | (code >> 18));
        bytes[1] = (unsigned char)(0x80 | ((code >> 12) & 0x3F));
        bytes[2] = (unsigned char)(0x80 | ((code >> 6) & 0x3F));
        bytes[3] = (unsigned char)(0x80 | (code & 0x3F));
        n = 4;
    }
    buf_put(out, bytes, n);
}

/* Next code point of a WTF-8 string we made ourselves (so well formed). */
static uint32_t wtf8_next(const char *text, size_t n, size_t *at) {
    uint32_t code = 0;
    size_t used = utf8_sequence((const unsigned char *)text + *at, n - *at, 1, &code);
    if (used == 0) { code = 0xFFFD; used = 1; } /* not reached for our own strings */
    *at += used;
    return code;
}

void wtf8_from_bytes(struct buf *out, const char *bytes, size_t n) {
    const unsigned char *s = (const unsigned char *)bytes;
    for (size_t i = 0; i < n;) {
        uint32_t code;
        size_t used = utf8_sequence(s + i, n - i, 0, &code);
        if (used == 0) { /* surrogateescape: one byte -> U+DC80..U+DCFF */
            put_code_point(out, 0xDC00u + s[i]);
            i++;
        } else {
            buf_put(out, s + i, used);
            i += used;
        }
    }
}

int wtf8_to_path(struct buf *out, const char *text, size_t n) {
    for (size_t at = 0; at < n;) {
        size_t start = at;
        uint32_t code = wtf8_next(text, n, &at);
        if (code == 0) return -1;
        if (code >= 0xDC80 && code <= 0xDCFF) { buf_putc(out, (char)(code - 0xDC00)); continue; }
        if (code >= 0xD800 && code <= 0xDFFF) return -1;
        buf_put(out, text + start, at - start);
    }
    return 0;
}

/* ---------------------------------------------------------------- JSON reader */

struct parser {
    struct json_doc *doc;
    const unsigned char *s;
    size_t len, at;
    int depth;
    struct buf *why;
    int status;
};

static int fail(struct parser *p, const char *problem) {
    if (p->status == JSON_OK) {
        size_t line = 1, column = 1;
        for (size_t i = 0; i < p->at && i < p->len; i++) {
            if (p->s[i] == '\n') { line++; column = 1; } else column++;
        }
        buf_printf(p->why, "%s: line %zu column %zu (char %zu)", problem, line, column, p->at);
        p->status = JSON_SYNTAX;
    }
    return -1;
}

static void skip_space(struct parser *p) {
    while (p->at < p->len && (p->s[p->at] == ' ' || p->s[p->at] == '\t' ||
                              p->s[p->at] == '\n' || p->s[p->at] == '\r'))
        p->at++;
}

static int new_node(struct parser *p, int type) {
    struct json_doc *doc = p->doc;
    if (doc->count == doc->cap) {
        size_t cap = doc->cap ? doc->cap * 2 : 64;
        struct json_node *nodes = realloc(doc->nodes, cap * sizeof *nodes);
        if (nodes == NULL) { p->status = JSON_NO_MEMORY; return -1; }
        doc->nodes = nodes;
        doc->cap = cap;
    }
    struct json_node *node = &doc->nodes[doc->count];
    memset(node, 0, sizeof *node);
    node->type = (uint8_t)type;
    node->start = (uint32_t)p->at;
    return (int)doc->count++;
}

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int scan_string(struct parser *p) {
    p->at++; /* the opening quote */
    while (p->at < p->len) {
        unsigned char c = p->s[p->at];
        if (c == '"') { p->at++; return 0; }
        if (c < 0x20) return fail(p, "Invalid control character in string");
        if (c == '\\') {
            if (p->at + 1 >= p->len) break;
            unsigned char e = p->s[p->at + 1];
            if (e == 'u') {
                for (int i = 2; i < 6; i++)
                    if (p->at + (size_t)i >= p->len || hex_value(p->s[p->at + (size_t)i]) < 0)
                        return fail(p, "Invalid \\uXXXX escape");
                p->at += 6;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == 0) return fail(p, "Invalid \\escape");
            p->at += 2;
            continue;
        }
        if (c < 0x80) { p->at++; continue; }
        uint32_t code;
        size_t used = utf8_sequence(p->s + p->at, p->len - p->at, 0, &code);
        if (used == 0) return fail(p, "Invalid UTF-8 in string");
        p->at += used;
    }
    return fail(p, "Unterminated string");
}

static int scan_number(struct parser *p) {
    size_t start = p->at;
    int integer = 1;
    if (p->s[p->at] == '-') p->at++;
    if (p->at < p->len && p->s[p->at] == '0') p->at++;
    else if (p->at < p->len && p->s[p->at] >= '1' && p->s[p->at] <= '9')
        while (p->at < p->len && p->s[p->at] >= '0' && p->s[p->at] <= '9') p->at++;
    else return fail(p, "Expecting value");
    if (p->at < p->len && p->s[p->at] == '.') {
        integer = 0;
        p->at++;
        if (p->at >= p->len || p->s[p->at] < '0' || p->s[p->at] > '9')
            return fail(p, "Expecting digits after the decimal point");
        while (p->at < p->len && p->s[p->at] >= '0' && p->s[p->at] <= '9') p->at++;
    }
    if (p->at < p->len && (p->s[p->at] == 'e' || p->s[p->at] == 'E')) {
        integer = 0;
        p->at++;
        if (p->at < p->len && (p->s[p->at] == '+' || p->s[p->at] == '-')) p->at++;
        if (p->at >= p->len || p->s[p->at] < '0' || p->s[p->at] > '9')
            return fail(p, "Expecting digits in the exponent");
        while (p->at < p->len && p->s[p->at] >= '0' && p->s[p->at] <= '9') p->at++;
    }
    if (integer && p->at - start - (p->s[start] == '-') > MAX_INT_DIGITS)
        return fail(p, "Integer longer than 4300 digits");
    return 0;
}

static int parse_value(struct parser *p);

static int parse_container(struct parser *p, int index, int object) {
    if (++p->depth > MAX_JSON_DEPTH) {
        if (p->status == JSON_OK) {
            buf_puts(p->why, "nested too deeply");
            p->status = JSON_TOO_DEEP;
        }
        return -1;
    }
    p->at++; /* [ or { */
    skip_space(p);
    char close = object ? '}' : ']';
    if (p->at < p->len && p->s[p->at] == close) {
        p->at++;
        p->depth--;
        return 0;
    }
    int previous = -1;
    for (;;) {
        skip_space(p);
        int first = (int)p->doc->count;
        if (object) {
            if (p->at >= p->len || p->s[p->at] != '"')
                return fail(p, "Expecting property name enclosed in double quotes");
            int key = new_node(p, JSON_STRING);
            if (key < 0 || scan_string(p) < 0) return -1;
            p->doc->nodes[key].end = (uint32_t)p->at;
            if (previous >= 0) p->doc->nodes[previous].next = (uint32_t)key;
            previous = key;
            skip_space(p);
            if (p->at >= p->len || p->s[p->at] != ':') return fail(p, "Expecting ':' delimiter");
            p->at++;
            skip_space(p);
            first = (int)p->doc->count;
        }
        if (parse_value(p) < 0) return -1;
        if (previous >= 0) p->doc->nodes[previous].next = (uint32_t)first;
        previous = first;
        p->doc->nodes[index].has_children = 1;
        skip_space(p);
        if (p->at < p->len && p->s[p->at] == ',') { p->at++; continue; }
        if (p->at < p->len && p->s[p->at] == close) { p->at++; break; }
        return fail(p, "Expecting ',' delimiter");
    }
    p->depth--;
    return 0;
}

static int parse_value(struct parser *p) {
    skip_space(p);
    if (p->at >= p->len) return fail(p, "Expecting value");
    unsigned char c = p->s[p->at];
    int type, result = 0;
    if (c == '{') type = JSON_OBJECT;
    else if (c == '[') type = JSON_ARRAY;
    else if (c == '"') type = JSON_STRING;
    else if (c == '-' || (c >= '0' && c <= '9')) type = JSON_NUMBER;
    else if (c == 't') type = JSON_TRUE;
    else if (c == 'f') type = JSON_FALSE;
    else if (c == 'n') type = JSON_NULL;
    else return fail(p, "Expecting value");
    int index = new_node(p, type);
    if (index < 0) return -1;
    if (type == JSON_OBJECT || type == JSON_ARRAY)
        result = parse_container(p, index, type == JSON_OBJECT);
    else if (type == JSON_STRING) result = scan_string(p);
    else if (type == JSON_NUMBER) result = scan_number(p);
    else {
        const char *word = type == JSON_TRUE ? "true" : type == JSON_FALSE ? "false" : "null";
        size_t n = strlen(word);
        if (p->len - p->at < n || memcmp(p->s + p->at, word, n) != 0)
            return fail(p, "Expecting value");
        p->at += n;
    }
    if (result < 0) return -1;
    p->doc->nodes[index].end = (uint32_t)p->at;
    return 0;
}

int json_parse(struct json_doc *doc, const char *text, size_t len, struct buf *why) {
    memset(doc, 0, sizeof *doc);
    doc->text = text;
    doc->len = len;
    struct parser p = {doc, (const unsigned char *)text, len, 0, 0, why, JSON_OK};
    if (len > UINT32_MAX - 1) { buf_puts(why, "too large"); return JSON_SYNTAX; }
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) p.at = 3; /* as json.loads(bytes) */
    if (parse_value(&p) == 0) {
        skip_space(&p);
        if (p.at != len) fail(&p, "Extra data");
    }
    return p.status;
}

void json_free(struct json_doc *doc) {
    free(doc->nodes);
    memset(doc, 0, sizeof *doc);
}

int json_first_child(const struct json_doc *doc, int index) {
    return doc->nodes[index].has_children ? index + 1 : -1;
}

int json_next(const struct json_doc *doc, int index) {
    return doc->nodes[index].next ? (int)doc->nodes[index].next : -1;
}

void json_string(const struct json_doc *doc, int index, struct buf *out) {
    const struct json_node *node = &doc->nodes[index];
    const unsigned char *s = (const unsigned char *)doc->text;
    size_t at = node->start + 1, end = node->end - 1;
    while (at < end) {
        if (s[at] != '\\') {
            size_t run = at;
            while (run < end && s[run] != '\\') run++;
            buf_put(out, s + at, run - at);
            at = run;
            continue;
        }
        unsigned char e = s[at + 1];
        if (e != 'u') {
            static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
            buf_putc(out, to[strchr(from, e) - from]);
            at += 2;
            continue;
        }
        uint32_t code = 0;
        for (int i = 2; i < 6; i++) code = code * 16 + (uint32_t)hex_value(s[at + (size_t)i]);
        at += 6;
        if (code >= 0xD800 && code <= 0xDBFF && at + 6 <= end && s[at] == '\\' && s[at + 1] == 'u') {
            uint32_t low = 0;
            for (int i = 2; i < 6; i++) low = low * 16 + (uint32_t)hex_value(s[at + (size_t)i]);
            if (low >= 0xDC00 && low <= 0xDFFF) {
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                at += 6;
            }
        }
        put_code_point(out, code);
    }
}

int json_string_is(const struct json_doc *doc, int index, const char *literal) {
    if (index < 0 || doc->nodes[index].type != JSON_STRING) return 0;
    const struct json_node *node = &doc->nodes[index];
    size_t raw = node->end - node->start - 2, n = strlen(literal);
    if (!memchr(doc->text + node->start + 1, '\\', raw))
        return raw == n && memcmp(doc->text + node->start + 1, literal, n) == 0;
    struct buf text = {0};
    json_string(doc, index, &text);
    int same = !text.failed && text.len == n &&
               (text.len == 0 || memcmp(text.data, literal, text.len) == 0);
    buf_free(&text);
    return same;
}

static int same_key(const struct json_doc *doc, int a, int b, struct buf *scratch_a,
                    struct buf *scratch_b) {
    const struct json_node *x = &doc->nodes[a], *y = &doc->nodes[b];
    size_t nx = x->end - x->start, ny = y->end - y->start;
    if (nx == ny && memcmp(doc->text + x->start, doc->text + y->start, nx) == 0) return 1;
    if (!memchr(doc->text + x->start, '\\', nx) && !memchr(doc->text + y->start, '\\', ny))
        return 0; /* no escapes: the text is the string */
    scratch_a->len = scratch_b->len = 0;
    json_string(doc, a, scratch_a);
    json_string(doc, b, scratch_b);
    return scratch_a->len == scratch_b->len &&
           (scratch_a->len == 0 || memcmp(scratch_a->data, scratch_b->data, scratch_a->len) == 0);
}

int json_lookup(const struct json_doc *doc, int object, const char *key) {
    if (object < 0 || doc->nodes[object].type != JSON_OBJECT) return -1;
    int found = -1;
    for (int k = json_first_child(doc, object); k >= 0;) {
        int value = json_next(doc, k);
        if (json_string_is(doc, k, key)) found = value;
        k = json_next(doc, value);
    }
    return found;
}

int json_is_int(const struct json_doc *doc, int index) {
    const struct json_node *node = &doc->nodes[index];
    if (node->type != JSON_NUMBER) return 0;
    for (uint32_t i = node->start; i < node->end; i++) {
        char c = doc->text[i];
        if (c == '.' || c == 'e' || c == 'E') return 0;
    }
    return 1;
}

double json_number(const struct json_doc *doc, int index) {
    const struct json_node *node = &doc->nodes[index];
    size_t n = node->end - node->start;
    char small[64];
    char *text = n < sizeof small ? small : malloc(n + 1);
    if (text == NULL) return NAN;
    memcpy(text, doc->text + node->start, n);
    text[n] = '\0';
    double value = strtod(text, NULL);
    if (text != small) free(text);
    return value;
}

/* Python's bool(value) for a parsed JSON value. */
int json_truthy(const struct json_doc *doc, int index) {
    const struct json_node *node = &doc->nodes[index];
    switch (node->type) {
    case JSON_NULL: case JSON_FALSE: return 0;
    case JSON_TRUE: return 1;
    case JSON_STRING: return node->end - node->start > 2;
    case JSON_ARRAY: case JSON_OBJECT: return node->has_children;
    default: return json_number(doc, index) != 0.0;
    }
}

/* ---------------------------------------------------------------- Python's formatting */

static int nonprintable(uint32_t code) {
    if (code < 0x80) return code < 0x20 || code == 0x7F;
    size_t low = 0, high = sizeof NONPRINTABLE / sizeof NONPRINTABLE[0];
    while (low < high) {
        size_t middle = (low + high) / 2;
        if (code < NONPRINTABLE[middle][0]) high = middle;
        else if (code > NONPRINTABLE[middle][1]) low = middle + 1;
        else return 1;
    }
    return 0;
}

void py_dumps_str(struct buf *out, const char *text, size_t n) {
    buf_putc(out, '"');
    for (size_t at = 0; at < n;) {
        uint32_t code = wtf8_next(text, n, &at);
        switch (code) {
        case '"': buf_puts(out, "\\\""); continue;
        case '\\': buf_puts(out, "\\\\"); continue;
        case '\n': buf_puts(out, "\\n"); continue;
        case '\r': buf_puts(out, "\\r"); continue;
        case '\t': buf_puts(out, "\\t"); continue;
        case '\b': buf_puts(out, "\\b"); continue;
        case '\f': buf_puts(out, "\\f"); continue;
        default: break;
        }
        if (code >= 0x20 && code <= 0x7E) buf_putc(out, (char)code);
        else if (code < 0x10000) buf_printf(out, "\\u%04x", code);
        else {
            uint32_t v = code - 0x10000;
            buf_printf(out, "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
        }
    }
    buf_putc(out, '"');
}

static char repr_quote(const char *text, size_t n) {
    int single = memchr(text, '\'', n) != NULL, dbl = memchr(text, '"', n) != NULL;
    return single && !dbl ? '"' : '\'';
}

void py_repr_str(struct buf *out, const char *text, size_t n) {
    char quote = repr_quote(text, n);
    buf_putc(out, quote);
    for (size_t at = 0; at < n;) {
        size_t start = at;
        uint32_t code = wtf8_next(text, n, &at);
        if (code == (uint32_t)quote || code == '\\') { buf_putc(out, '\\'); buf_putc(out, (char)code); }
        else if (code == '\t') buf_puts(out, "\\t");
        else if (code == '\n') buf_puts(out, "\\n");
        else if (code == '\r') buf_puts(out, "\\r");
        else if (!nonprintable(code)) buf_put(out, text + start, at - start);
        else if (code < 0x100) buf_printf(out, "\\x%02x", code);
        else if (code < 0x10000) buf_printf(out, "\\u%04x", code);
        else buf_printf(out, "\\U%08x", code);
    }
    buf_putc(out, quote);
}

void py_repr_bytes(struct buf *out, const char *bytes, size_t n) {
    char quote = repr_quote(bytes, n);
    buf_putc(out, 'b');
    buf_putc(out, quote);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)bytes[i];
        if (c == (unsigned char)quote || c == '\\') { buf_putc(out, '\\'); buf_putc(out, (char)c); }
        else if (c == '\t') buf_puts(out, "\\t");
        else if (c == '\n') buf_puts(out, "\\n");
        else if (c == '\r') buf_puts(out, "\\r");
        else if (c < 0x20 || c >= 0x7F) buf_printf(out, "\\x%02x", c);
        else buf_putc(out, (char)c);
    }
    buf_putc(out, quote);
}

/* float.__repr__: the shortest text that reads back as the same double. */
void py_float_repr(struct buf *out, double value) {
    if (isnan(value)) { buf_puts(out, "nan"); return; }
    if (isinf(value)) { buf_puts(out, value < 0 ? "-inf" : "inf"); return; }
    char text[40];
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(text, sizeof text, "%.*e", precision - 1, value);
        if (strtod(text, NULL) == value) break;
    }
    const char *p = text;
    if (*p == '-') { buf_putc(out, '-'); p++; }
    char digits[24];
    size_t count = 0;
    for (; *p && *p != 'e'; p++)
        if (*p != '.') digits[count++] = *p;
    int exponent = atoi(p + 1), point = exponent + 1;
    while (count > 1 && digits[count - 1] == '0') count--;
    if (point <= -4 || point > 16) {
        buf_putc(out, digits[0]);
        if (count > 1) { buf_putc(out, '.'); buf_put(out, digits + 1, count - 1); }
        buf_printf(out, "e%c%02d", exponent < 0 ? '-' : '+', abs(exponent));
    } else if (point <= 0) {
        buf_puts(out, "0.");
        for (int i = 0; i < -point; i++) buf_putc(out, '0');
        buf_put(out, digits, count);
    } else if ((size_t)point >= count) {
        buf_put(out, digits, count);
        for (size_t i = count; i < (size_t)point; i++) buf_putc(out, '0');
        buf_puts(out, ".0");
    } else {
        buf_put(out, digits, (size_t)point);
        buf_putc(out, '.');
        buf_put(out, digits + point, count - (size_t)point);
    }
}

void py_format_g(struct buf *out, double value) { buf_printf(out, "%g", value); }

static void put_number(struct buf *out, const struct json_doc *doc, int index, int dumps) {
    const struct json_node *node = &doc->nodes[index];
    if (json_is_int(doc, index)) {
        size_t n = node->end - node->start;
        if (n == 2 && memcmp(doc->text + node->start, "-0", 2) == 0) buf_putc(out, '0');
        else buf_put(out, doc->text + node->start, n);
        return;
    }
    double value = json_number(doc, index);
    if (dumps && isinf(value)) buf_puts(out, value < 0 ? "-Infinity" : "Infinity");
    else py_float_repr(out, value);
}

#define MAX_DEDUPLICATED_KEYS 256 /* past this, repeated keys are printed as they came */

static void put_value(struct buf *out, const struct json_doc *doc, int index, int dumps);

static void put_object(struct buf *out, const struct json_doc *doc, int index, int dumps) {
    struct buf a = {0}, b = {0};
    size_t pairs = 0;
    for (int k = json_first_child(doc, index); k >= 0; k = json_next(doc, json_next(doc, k)))
        pairs++;
    int dedupe = pairs <= MAX_DEDUPLICATED_KEYS, first = 1;
    buf_putc(out, '{');
    for (int k = json_first_child(doc, index); k >= 0; k = json_next(doc, json_next(doc, k))) {
        int value = json_next(doc, k), seen = 0;
        if (dedupe) { /* a dict keeps the first key's place and the last key's value */
            for (int e = json_first_child(doc, index); e != k && !seen; e = json_next(doc, json_next(doc, e)))
                seen = same_key(doc, e, k, &a, &b);
            for (int l = json_next(doc, value); l >= 0 && !seen; l = json_next(doc, json_next(doc, l)))
                if (same_key(doc, l, k, &a, &b)) value = json_next(doc, l);
        }
        if (seen) continue;
        if (!first) buf_puts(out, ", ");
        first = 0;
        put_value(out, doc, k, dumps);
        buf_puts(out, ": ");
        put_value(out, doc, value, dumps);
    }
    buf_putc(out, '}');
    buf_free(&a);
    buf_free(&b);
}

static void put_value(struct buf *out, const struct json_doc *doc, int index, int dumps) {
    const struct json_node *node = &doc->nodes[index];
    switch (node->type) {
    case JSON_NULL: buf_puts(out, dumps ? "null" : "None"); return;
    case JSON_TRUE: buf_puts(out, dumps ? "true" : "True"); return;
    case JSON_FALSE: buf_puts(out, dumps ? "false" : "False"); return;
    case JSON_NUMBER: put_number(out, doc, index, dumps); return;
    case JSON_STRING: {
        struct buf text = {0};
        json_string(doc, index, &text);
        if (dumps) py_dumps_str(out, text.data ? text.data : "", text.len);
        else py_repr_str(out, text.data ? text.data : "", text.len);
        if (text.failed) out->failed = 1;
        buf_free(&text);
        return;
    }
    case JSON_ARRAY:
        buf_putc(out, '[');
        for (int c = json_first_child(doc, index); c >= 0; c = json_next(doc, c)) {
            if (c != index + 1) buf_puts(out, ", ");
            put_value(out, doc, c, dumps);
        }
        buf_putc(out, ']');
        return;
    default: put_object(out, doc, index, dumps);
    }
}

void py_dumps(struct buf *out, const struct json_doc *doc, int index) { put_value(out, doc, index, 1); }
void py_repr(struct buf *out, const struct json_doc *doc, int index) { put_value(out, doc, index, 0); }

void json_compact(struct buf *out, const struct json_doc *doc, int index) {
    const struct json_node *node = &doc->nodes[index];
    int in_string = 0;
    size_t run = node->start;
    for (size_t i = node->start; i < node->end; i++) {
        char c = doc->text[i];
        if (in_string) {
            if (c == '\\') i++;
            else if (c == '"') in_string = 0;
        } else if (c == '"') in_string = 1;
        else if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            buf_put(out, doc->text + run, i - run);
            run = i + 1;
        }
    }
    buf_put(out, doc->text + run, node->end - run);
}

/* ---------------------------------------------------------------- errors */

void cni_error_set(struct cni_error *error, long code, const char *msg, const char *details) {
    snprintf(error->code, sizeof error->code, "%ld", code);
    error->msg.len = error->details.len = 0;
    buf_puts(&error->msg, msg);
    buf_puts(&error->details, details);
}

void cni_error_free(struct cni_error *error) {
    buf_free(&error->msg);
    buf_free(&error->details);
}

static int bad_config(struct cni_error *error, struct buf *problem) {
    struct buf msg = {0};
    buf_puts(&msg, "invalid pinion-cni network config: ");
    buf_put(&msg, problem->data, problem->len);
    cni_error_set(error, ERR_INVALID_CONFIG, buf_cstr(&msg), "");
    buf_free(&msg);
    buf_free(problem);
    return -1;
}

/* ---------------------------------------------------------------- the network config */

static const char *const SUPPORTED_VERSIONS[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0"};
#define N_VERSIONS (sizeof SUPPORTED_VERSIONS / sizeof SUPPORTED_VERSIONS[0])

int cni_decode_config(struct json_doc *doc, const char *text, size_t len, struct cni_error *error) {
    struct buf why = {0}, msg = {0};
    int status = json_parse(doc, text, len, &why);
    int result = -1;
    if (status == JSON_TOO_DEEP)
        cni_error_set(error, ERR_DECODE, "network config on stdin is nested too deeply to be one", "");
    else if (status == JSON_NO_MEMORY)
        cni_error_set(error, ERR_INTERNAL, "pinion-cni bug: MemoryError()", "");
    else if (status != JSON_OK) {
        buf_puts(&msg, "network config on stdin is not valid JSON: ");
        buf_put(&msg, why.data, why.len);
        cni_error_set(error, ERR_DECODE, buf_cstr(&msg), "");
    } else if (doc->nodes[0].type != JSON_OBJECT)
        cni_error_set(error, ERR_DECODE, "network config on stdin must be a JSON object", "");
    else result = 0;
    buf_free(&why);
    buf_free(&msg);
    return result;
}

static const char *supported_version(const struct json_doc *doc, int index) {
    for (size_t i = 0; i < N_VERSIONS; i++)
        if (json_string_is(doc, index, SUPPORTED_VERSIONS[i])) return SUPPORTED_VERSIONS[i];
    return NULL;
}

const char *cni_error_version(const struct json_doc *doc) {
    if (doc->count == 0 || doc->nodes[0].type != JSON_OBJECT) return OWN_VERSION;
    const char *version = supported_version(doc, json_lookup(doc, 0, "cniVersion"));
    return version ? version : OWN_VERSION;
}

static int config_path(const struct json_doc *doc, const char *key, const char *fallback,
                       struct buf *out, struct cni_error *error) {
    int value = json_lookup(doc, 0, key);
    if (value < 0) { buf_puts(out, fallback); return 0; }
    if (doc->nodes[value].type == JSON_STRING && doc->nodes[value].end - doc->nodes[value].start > 2) {
        json_string(doc, value, out);
        struct buf bytes = {0};
        int usable = wtf8_to_path(&bytes, out->data, out->len);
        buf_free(&bytes);
        if (usable == 0) return 0;
        /* The reference fails on these as its own bug (ValueError from the OS layer). */
        struct buf problem = {0};
        buf_printf(&problem, "\"%s\" must be a path without NUL bytes or unpaired surrogates, got ", key);
        py_repr(&problem, doc, value);
        return bad_config(error, &problem);
    }
    struct buf problem = {0};
    buf_printf(&problem, "\"%s\" must be a non-empty path, got ", key);
    py_repr(&problem, doc, value);
    return bad_config(error, &problem);
}

static int config_timeout(const struct json_doc *doc, double *out, struct cni_error *error) {
    int value = json_lookup(doc, 0, "timeoutSeconds");
    if (value < 0) { *out = DEFAULT_TIMEOUT_SECONDS; return 0; }
    if (doc->nodes[value].type == JSON_NUMBER) {
        double seconds = json_number(doc, value);
        if (isfinite(seconds) && seconds > 0 && seconds <= MAX_TIMEOUT_SECONDS) {
            *out = seconds;
            return 0;
        }
    }
    struct buf problem = {0};
    buf_puts(&problem, "\"timeoutSeconds\" must be a number > 0 and at most ");
    py_format_g(&problem, MAX_TIMEOUT_SECONDS);
    buf_puts(&problem, ", got ");
    py_repr(&problem, doc, value);
    return bad_config(error, &problem);
}

int cni_parse_netconf(const struct json_doc *doc, struct netconf *conf, struct cni_error *error) {
    memset(conf, 0, sizeof *conf);
    conf->prev_result = -1;
    int version = json_lookup(doc, 0, "cniVersion");
    if (version < 0 || doc->nodes[version].type != JSON_STRING ||
        doc->nodes[version].end - doc->nodes[version].start == 2) {
        struct buf problem = {0};
        buf_puts(&problem, "\"cniVersion\" is missing or not a string");
        return bad_config(error, &problem);
    }
    conf->version = supported_version(doc, version);
    if (conf->version == NULL) {
        struct buf msg = {0};
        buf_puts(&msg, "cniVersion ");
        py_repr(&msg, doc, version);
        buf_puts(&msg, " in the network config is not supported by pinion-cni");
        cni_error_set(error, ERR_INCOMPATIBLE_VERSION, buf_cstr(&msg),
                      "supported versions: 0.3.0, 0.3.1, 0.4.0, 1.0.0");
        buf_free(&msg);
        return -1;
    }
    int type = json_lookup(doc, 0, "type");
    if (!json_string_is(doc, type, PLUGIN_TYPE)) {
        struct buf problem = {0};
        buf_puts(&problem, "\"type\" is ");
        if (type < 0) buf_puts(&problem, "None");
        else py_repr(&problem, doc, type);
        buf_puts(&problem, ", expected \"pinion-cni\"");
        return bad_config(error, &problem);
    }
    int policy = json_lookup(doc, 0, "failPolicy");
    if (policy >= 0 && !json_string_is(doc, policy, "closed") && !json_string_is(doc, policy, "open")) {
        struct buf problem = {0};
        buf_puts(&problem, "\"failPolicy\" must be \"closed\" or \"open\", got ");
        py_repr(&problem, doc, policy);
        return bad_config(error, &problem);
    }
    conf->fail_open = policy >= 0 && json_string_is(doc, policy, "open");
    int prev = json_lookup(doc, 0, "prevResult");
    if (prev >= 0 && doc->nodes[prev].type != JSON_NULL) {
        if (doc->nodes[prev].type != JSON_OBJECT) {
            struct buf problem = {0};
            buf_puts(&problem, "\"prevResult\" must be an object");
            return bad_config(error, &problem);
        }
        conf->prev_result = prev;
    }
    if (config_path(doc, "agentSocket", DEFAULT_AGENT_SOCKET, &conf->agent_socket, error) < 0 ||
        config_timeout(doc, &conf->timeout_seconds, error) < 0 ||
        config_path(doc, "pendingDir", DEFAULT_PENDING_DIR, &conf->pending_dir, error) < 0)
        return -1;
    return 0;
}

void netconf_free(struct netconf *conf) {
    buf_free(&conf->agent_socket);
    buf_free(&conf->pending_dir);
}

/* ---------------------------------------------------------------- CNI_* variables */

static int env_error(struct cni_error *error, struct buf *msg, const char *details) {
    cni_error_set(error, ERR_INVALID_ENV, buf_cstr(msg), details);
    buf_free(msg);
    return -1;
}

static const char *require_env(env_lookup lookup, void *context, const char *name,
                               const char *command, struct cni_error *error) {
    const char *value = lookup(name, context);
    if (value != NULL && *value) return value;
    struct buf msg = {0};
    buf_printf(&msg, "environment variable %s is not set; %s needs it", name, command);
    env_error(error, &msg, "");
    return NULL;
}

static int valid_container_id(const char *id) {
    const char *p = id;
    if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9')))
        return 0;
    for (p++; *p; p++)
        if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') ||
              *p == '_' || *p == '.' || *p == '-'))
            return 0;
    return 1;
}

struct pair { size_t key, key_len, value, value_len; };

/* CNI_ARGS "K=V;K=V" -> the JSON object Python's json.dumps(dict) prints (a repeated key
 * keeps its first place and takes its last value). */
static int parse_cni_args(const char *raw, struct buf *json, struct cni_error *error) {
    struct buf text = {0};
    wtf8_from_bytes(&text, raw, strlen(raw));
    const char *s = buf_cstr(&text);
    size_t n = text.len, count = 0, cap = 0;
    struct pair *pairs = NULL;
    int result = 0;
    for (size_t start = 0; start <= n && !text.failed;) {
        const char *end = memchr(s + start, ';', n - start);
        size_t stop = end ? (size_t)(end - s) : n;
        if (stop > start) {
            const char *equals = memchr(s + start, '=', stop - start);
            if (equals == NULL || equals == s + start) {
                struct buf msg = {0}, details = {0};
                buf_puts(&msg, "CNI_ARGS has a malformed pair ");
                py_repr_str(&msg, s + start, stop - start);
                buf_puts(&msg, "; expected KEY=VALUE pairs joined by ';'");
                buf_puts(&details, "CNI_ARGS=");
                buf_put(&details, s, n);
                result = env_error(error, &msg, buf_cstr(&details));
                buf_free(&details);
                break;
            }
            struct pair pair = {start, (size_t)(equals - (s + start)), (size_t)(equals - s) + 1,
                                stop - ((size_t)(equals - s) + 1)};
            size_t i = 0;
            /* Past 8192 distinct keys the request is over its 64 KiB whatever follows: stop
             * looking for repeats (quadratic) and let the size check refuse it. */
            for (; i < count && count < 8192; i++)
                if (pairs[i].key_len == pair.key_len && memcmp(s + pairs[i].key, s + pair.key, pair.key_len) == 0)
                    break;
            if (i < count && count < 8192) pairs[i].value = pair.value, pairs[i].value_len = pair.value_len;
            else {
                if (count == cap) {
                    cap = cap ? cap * 2 : 16;
                    struct pair *grown = realloc(pairs, cap * sizeof *pairs);
                    if (grown == NULL) { json->failed = 1; break; }
                    pairs = grown;
                }
                pairs[count++] = pair;
            }
        }
        start = stop + 1;
    }
    if (result == 0) {
        buf_putc(json, '{');
        for (size_t i = 0; i < count; i++) {
            if (i) buf_puts(json, ", ");
            py_dumps_str(json, s + pairs[i].key, pairs[i].key_len);
            buf_puts(json, ": ");
            py_dumps_str(json, s + pairs[i].value, pairs[i].value_len);
        }
        buf_putc(json, '}');
    }
    free(pairs);
    if (text.failed) json->failed = 1;
    buf_free(&text);
    return result;
}

int cni_read_invocation(env_lookup lookup, void *context, struct invocation *invocation,
                        struct cni_error *error) {
    memset(invocation, 0, sizeof *invocation);
    const char *command = require_env(lookup, context, "CNI_COMMAND", "any command", error);
    if (command == NULL) return -1;
    static const char *const commands[] = {"ADD", "DEL", "CHECK"};
    for (size_t i = 0; i < 3; i++)
        if (strcmp(command, commands[i]) == 0) invocation->command = commands[i];
    if (invocation->command == NULL) {
        struct buf msg = {0}, text = {0};
        wtf8_from_bytes(&text, command, strlen(command));
        buf_puts(&msg, "CNI_COMMAND=");
        py_repr_str(&msg, buf_cstr(&text), text.len);
        buf_puts(&msg, " is not one of ADD, DEL, CHECK, VERSION");
        buf_free(&text);
        return env_error(error, &msg, "");
    }
    const char *id = require_env(lookup, context, "CNI_CONTAINERID", command, error);
    if (id == NULL) return -1;
    wtf8_from_bytes(&invocation->container_id, id, strlen(id));
    if (!valid_container_id(id)) {
        struct buf msg = {0};
        buf_puts(&msg, "CNI_CONTAINERID=");
        py_repr_str(&msg, buf_cstr(&invocation->container_id), invocation->container_id.len);
        buf_puts(&msg, " is not a valid container id");
        return env_error(error, &msg,
                         "expected letters, digits, '_', '.' or '-', starting with a letter or digit");
    }
    if (strcmp(command, "DEL") != 0) { /* DEL may come after the netns is gone */
        if (require_env(lookup, context, "CNI_NETNS", command, error) == NULL ||
            require_env(lookup, context, "CNI_IFNAME", command, error) == NULL)
            return -1;
    }
    const char *netns = lookup("CNI_NETNS", context), *if_name = lookup("CNI_IFNAME", context);
    const char *args = lookup("CNI_ARGS", context);
    wtf8_from_bytes(&invocation->netns, netns ? netns : "", netns ? strlen(netns) : 0);
    wtf8_from_bytes(&invocation->if_name, if_name ? if_name : "", if_name ? strlen(if_name) : 0);
    return parse_cni_args(args ? args : "", &invocation->args_json, error);
}

void invocation_free(struct invocation *invocation) {
    buf_free(&invocation->container_id);
    buf_free(&invocation->netns);
    buf_free(&invocation->if_name);
    buf_free(&invocation->args_json);
}

int cni_require_prev_result(const struct invocation *invocation, const struct netconf *conf,
                            struct cni_error *error) {
    if (strcmp(invocation->command, "DEL") == 0 || conf->prev_result >= 0) return 0;
    struct buf msg = {0};
    buf_printf(&msg, "%s without prevResult: pinion-cni must be chained after a plugin that "
               "creates the pod interface (e.g. bridge)", invocation->command);
    cni_error_set(error, ERR_INVALID_CONFIG, buf_cstr(&msg), "");
    buf_free(&msg);
    return -1;
}

/* ---------------------------------------------------------------- addresses (ipaddress) */

typedef unsigned __int128 u128;

static int ascii_digits(const char *s, size_t n) {
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}

/* IPv4Address(str): four decimal octets, no leading zeros. */
static int parse_ipv4(const char *s, size_t n, uint32_t *out) {
    uint32_t value = 0;
    size_t start = 0;
    int octets = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && s[i] != '.') continue;
        size_t len = i - start;
        if (++octets > 4 || !ascii_digits(s + start, len) || len > 3 ||
            (len > 1 && s[start] == '0'))
            return -1;
        uint32_t octet = 0;
        for (size_t j = start; j < i; j++) octet = octet * 10 + (uint32_t)(s[j] - '0');
        if (octet > 255) return -1;
        value = (value << 8) | octet;
        start = i + 1;
    }
    if (octets != 4) return -1;
    *out = value;
    return 0;
}

static int parse_hextet(const char *s, size_t n, uint32_t *out) {
    if (n == 0 || n > 4) return -1;
    uint32_t value = 0;
    for (size_t i = 0; i < n; i++) {
        int digit = hex_value((unsigned char)s[i]);
        if (digit < 0) return -1;
        value = value * 16 + (uint32_t)digit;
    }
    *out = value;
    return 0;
}

/* IPv6Address._ip_int_from_string, as Python 3.11 has it. */
static int parse_ipv6(const char *s, size_t n, u128 *out) {
    struct { size_t start, len; } parts[10];
    char tail[2][8];
    size_t count = 0, start = 0;
    if (n == 0) return -1;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && s[i] != ':') continue;
        if (count == 10) return -1; /* more than 9 parts even before the IPv4 tail */
        parts[count].start = start;
        parts[count].len = i - start;
        count++;
        start = i + 1;
    }
    if (count < 3) return -1;
    const char *base[11];
    size_t lens[11];
    for (size_t i = 0; i < count; i++) { base[i] = s + parts[i].start; lens[i] = parts[i].len; }
    if (memchr(base[count - 1], '.', lens[count - 1])) {
        uint32_t v4;
        if (parse_ipv4(base[count - 1], lens[count - 1], &v4) < 0) return -1;
        snprintf(tail[0], sizeof tail[0], "%x", (v4 >> 16) & 0xFFFF);
        snprintf(tail[1], sizeof tail[1], "%x", v4 & 0xFFFF);
        base[count - 1] = tail[0];
        lens[count - 1] = strlen(tail[0]);
        base[count] = tail[1];
        lens[count] = strlen(tail[1]);
        count++;
    }
    if (count > 9) return -1;
    size_t skip = 0, hi, lo, skipped;
    int have_skip = 0;
    for (size_t i = 1; i + 1 < count; i++) {
        if (lens[i] == 0) {
            if (have_skip) return -1;
            skip = i;
            have_skip = 1;
        }
    }
    if (have_skip) {
        hi = skip;
        lo = count - skip - 1;
        if (lens[0] == 0 && --hi) return -1;
        if (lens[count - 1] == 0 && --lo) return -1;
        if (hi + lo >= 8) return -1;
        skipped = 8 - (hi + lo);
    } else {
        if (count != 8 || lens[0] == 0 || lens[count - 1] == 0) return -1;
        hi = count;
        lo = 0;
        skipped = 0;
    }
    u128 value = 0;
    for (size_t i = 0; i < hi; i++) {
        uint32_t hextet;
        if (parse_hextet(base[i], lens[i], &hextet) < 0) return -1;
        value = (value << 16) | hextet;
    }
    value <<= 16 * skipped;
    for (size_t i = count - lo; i < count; i++) {
        uint32_t hextet;
        if (parse_hextet(base[i], lens[i], &hextet) < 0) return -1;
        value = (value << 16) | hextet;
    }
    *out = value;
    return 0;
}

static void put_ipv4(struct buf *out, uint32_t v) {
    buf_printf(out, "%u.%u.%u.%u", v >> 24, (v >> 16) & 255, (v >> 8) & 255, v & 255);
}

static void put_ipv6(struct buf *out, u128 v) {
    unsigned hextets[8];
    for (int i = 7; i >= 0; i--) { hextets[i] = (unsigned)(v & 0xFFFF); v >>= 16; }
    int best = -1, best_len = 0, run = -1, run_len = 0;
    for (int i = 0; i < 8; i++) {
        if (hextets[i] == 0) {
            if (run < 0) run = i;
            if (++run_len > best_len) { best_len = run_len; best = run; }
        } else { run = -1; run_len = 0; }
    }
    if (best_len < 2) best = -1;
    for (int i = 0; i < 8; i++) {
        if (i == best) {
            buf_puts(out, i == 0 ? "::" : ":");
            i += best_len - 1;
            continue;
        }
        buf_printf(out, "%x", hextets[i]);
        if (i < 7) buf_putc(out, ':');
    }
}

/* Python's prefix-string check (ascii digits, 0..max) and, for IPv4, a dotted netmask or
 * hostmask. */
static int valid_mask(const char *s, size_t n, int v6) {
    if (ascii_digits(s, n)) {
        size_t i = 0;
        while (i + 1 < n && s[i] == '0') i++;
        if (n - i > 3) return 0;
        unsigned value = 0;
        for (; i < n; i++) value = value * 10 + (unsigned)(s[i] - '0');
        return value <= (v6 ? 128u : 32u);
    }
    uint32_t mask;
    if (v6 || parse_ipv4(s, n, &mask) < 0) return 0;
    uint32_t inverted = ~mask;
    /* a netmask is ones then zeros; a hostmask is zeros then ones */
    return (inverted & (inverted + 1)) == 0 || (mask & (mask + 1)) == 0;
}

/* The integer a JSON int/bool is, when it is one that fits 128 bits and is not negative. */
static int json_address_int(const struct json_doc *doc, int index, u128 *out) {
    const struct json_node *node = &doc->nodes[index];
    if (node->type == JSON_TRUE || node->type == JSON_FALSE) {
        *out = node->type == JSON_TRUE;
        return 0;
    }
    if (!json_is_int(doc, index)) return -1;
    const char *s = doc->text + node->start;
    size_t n = node->end - node->start;
    if (n == 2 && memcmp(s, "-0", 2) == 0) { *out = 0; return 0; }
    if (s[0] == '-' || n > 39) return -1;
    u128 value = 0, most = ~(u128)0;
    for (size_t i = 0; i < n; i++) {
        unsigned digit = (unsigned)(s[i] - '0');
        if (value > (most - digit) / 10) return -1;
        value = value * 10 + digit;
    }
    *out = value;
    return 0;
}

/* str(ipaddress.ip_interface(value).ip) (interface=1) or str(ip_address(value)); -1 when
 * Python would raise ValueError. */
static int normalize_address(const struct json_doc *doc, int index, int interface, struct buf *out) {
    u128 number;
    if (json_address_int(doc, index, &number) == 0) {
        if (number <= 0xFFFFFFFFu) put_ipv4(out, (uint32_t)number);
        else put_ipv6(out, number);
        return 0;
    }
    if (doc->nodes[index].type != JSON_STRING) return -1; /* floats, None, lists, dicts */
    struct buf text = {0};
    json_string(doc, index, &text);
    const char *s = buf_cstr(&text);
    size_t n = text.len, address_len = n;
    const char *slash = memchr(s, '/', n);
    int result = -1;
    if (slash != NULL) {
        if (!interface || memchr(slash + 1, '/', n - (size_t)(slash - s) - 1)) goto done;
        address_len = (size_t)(slash - s);
    }
    uint32_t v4;
    if (parse_ipv4(s, address_len, &v4) == 0 &&
        (slash == NULL || valid_mask(slash + 1, n - address_len - 1, 0))) {
        put_ipv4(out, v4);
        result = 0;
        goto done;
    }
    const char *percent = memchr(s, '%', address_len);
    size_t host_len = percent ? (size_t)(percent - s) : address_len;
    if (percent != NULL) {
        size_t scope_len = address_len - host_len - 1;
        if (scope_len == 0 || memchr(percent + 1, '%', scope_len)) goto done;
    }
    u128 v6;
    if (parse_ipv6(s, host_len, &v6) < 0 ||
        (slash != NULL && !valid_mask(slash + 1, n - address_len - 1, 1)))
        goto done;
    put_ipv6(out, v6);
    if (percent != NULL && !interface) buf_put(out, percent, address_len - host_len);
    result = 0;
done:
    buf_free(&text);
    return result;
}

/* A list of strings: each entry a 4-byte length, then its bytes (a scope id may hold any
 * character, so no separator will do). */
static void list_add(struct buf *list, const char *item, size_t len) {
    uint32_t n = (uint32_t)len;
    buf_put(list, &n, sizeof n);
    buf_put(list, item, len);
}

static int list_has(const struct buf *list, const struct buf *item) {
    for (size_t at = 0; at + sizeof(uint32_t) <= list->len;) {
        uint32_t n;
        memcpy(&n, list->data + at, sizeof n);
        at += sizeof n;
        if (n == item->len && memcmp(list->data + at, item->data, n) == 0) return 1;
        at += n;
    }
    return 0;
}

static void put_string_list(struct buf *json, const struct buf *list) {
    buf_putc(json, '[');
    for (size_t at = 0; at + sizeof(uint32_t) <= list->len;) {
        uint32_t n;
        memcpy(&n, list->data + at, sizeof n);
        if (at) buf_puts(json, ", ");
        at += sizeof n;
        py_dumps_str(json, list->data + at, n);
        at += n;
    }
    buf_putc(json, ']');
}

static int invalid_address(const struct json_doc *doc, int index, int value, int interface,
                           struct cni_error *error) {
    struct buf problem = {0};
    buf_printf(&problem, "prevResult.ips[%d] has an invalid address: ", index);
    if (value < 0) buf_puts(&problem, "None");
    else py_repr(&problem, doc, value);
    buf_printf(&problem, " does not appear to be an IPv4 or IPv6 %s", interface ? "interface" : "address");
    return bad_config(error, &problem);
}

/* Pod IPs (no prefix length) and distinct gateways, "\n"-joined, from prevResult.ips. */
static int pod_addresses(const struct json_doc *doc, int prev_result, struct buf *ips,
                         struct buf *gateways, struct cni_error *error) {
    int entries = prev_result >= 0 ? json_lookup(doc, prev_result, "ips") : -1;
    if (entries < 0) return 0;
    if (doc->nodes[entries].type != JSON_ARRAY) {
        struct buf problem = {0};
        buf_puts(&problem, "prevResult.ips must be a list");
        return bad_config(error, &problem);
    }
    int index = 0;
    for (int entry = json_first_child(doc, entries); entry >= 0; entry = json_next(doc, entry), index++) {
        if (doc->nodes[entry].type != JSON_OBJECT) {
            struct buf problem = {0};
            buf_printf(&problem, "prevResult.ips[%d] must be an object", index);
            return bad_config(error, &problem);
        }
        int address = json_lookup(doc, entry, "address");
        struct buf normal = {0};
        if (address < 0 || normalize_address(doc, address, 1, &normal) < 0) {
            buf_free(&normal);
            return invalid_address(doc, index, address, 1, error);
        }
        list_add(ips, normal.data, normal.len);
        normal.len = 0;
        int gateway = json_lookup(doc, entry, "gateway");
        if (gateway >= 0 && json_truthy(doc, gateway)) {
            if (normalize_address(doc, gateway, 0, &normal) < 0) {
                buf_free(&normal);
                return invalid_address(doc, index, gateway, 0, error);
            }
            if (!list_has(gateways, &normal)) list_add(gateways, normal.data, normal.len);
        }
        buf_free(&normal);
    }
    return 0;
}

int cni_build_request(const struct invocation *invocation, const struct netconf *conf,
                      const struct json_doc *doc, struct buf *request, struct cni_error *error) {
    struct buf ips = {0}, gateways = {0};
    if (pod_addresses(doc, conf->prev_result, &ips, &gateways, error) < 0) {
        buf_free(&ips);
        buf_free(&gateways);
        return -1;
    }
    buf_printf(request, "{\"version\": 1, \"command\": \"%s\", \"containerId\": ", invocation->command);
    py_dumps_str(request, invocation->container_id.data, invocation->container_id.len);
    buf_puts(request, ", \"netns\": ");
    py_dumps_str(request, invocation->netns.data, invocation->netns.len);
    buf_puts(request, ", \"ifName\": ");
    py_dumps_str(request, invocation->if_name.data, invocation->if_name.len);
    buf_puts(request, ", \"args\": ");
    buf_put(request, invocation->args_json.data, invocation->args_json.len);
    buf_puts(request, ", \"ips\": ");
    put_string_list(request, &ips);
    buf_puts(request, ", \"gateways\": ");
    put_string_list(request, &gateways);
    buf_printf(request, ", \"cniVersion\": \"%s\"}", conf->version);
    buf_free(&ips);
    buf_free(&gateways);
    return 0;
}

/* ---------------------------------------------------------------- the agent's reply */

int cni_check_reply(const char *line, size_t len, const char *socket_path, struct cni_error *error) {
    size_t first = 0, last = len;
    while (first < last && strchr(" \t\n\r\v\f", line[first]) && line[first]) first++;
    while (last > first && strchr(" \t\n\r\v\f", line[last - 1]) && line[last - 1]) last--;
    struct buf msg = {0}, details = {0}, why = {0};
    if (first == last) {
        buf_printf(&msg, "pinion agent at %s closed the connection without replying", socket_path);
        cni_error_set(error, ERR_IO, buf_cstr(&msg),
                      "the agent may have crashed while handling this pod; see the agent log");
        buf_free(&msg);
        return 1;
    }
    struct json_doc doc;
    int parsed = json_parse(&doc, line, len, &why) == JSON_OK && doc.nodes[0].type == JSON_OBJECT;
    int ok = parsed ? json_lookup(&doc, 0, "ok") : -1;
    int result = 1;
    if (ok < 0 || (doc.nodes[ok].type != JSON_TRUE && doc.nodes[ok].type != JSON_FALSE)) {
        buf_printf(&msg, "pinion agent at %s sent an invalid reply; expected one JSON object "
                   "with a boolean \"ok\"", socket_path);
        buf_puts(&details, "reply: ");
        py_repr_bytes(&details, line, len < 200 ? len : 200);
        cni_error_set(error, ERR_IO, buf_cstr(&msg), buf_cstr(&details));
    } else if (doc.nodes[ok].type == JSON_TRUE) {
        result = 0;
    } else {
        int code = json_lookup(&doc, 0, "code"), text = json_lookup(&doc, 0, "msg");
        int more = json_lookup(&doc, 0, "details");
        if (text >= 0 && doc.nodes[text].type == JSON_STRING && doc.nodes[text].end - doc.nodes[text].start > 2)
            json_string(&doc, text, &msg);
        else buf_puts(&msg, "pinion agent refused the request without saying why");
        if (more >= 0 && doc.nodes[more].type == JSON_STRING) json_string(&doc, more, &details);
        else if (more >= 0) py_dumps(&details, &doc, more);
        cni_error_set(error, ERR_AGENT_REFUSED, "", "");
        buf_put(&error->msg, msg.data, msg.len);
        buf_put(&error->details, details.data, details.len);
        const struct json_node *node = code >= 0 ? &doc.nodes[code] : NULL;
        size_t digits = node ? node->end - node->start : 0;
        if (node != NULL && json_is_int(&doc, code) && doc.text[node->start] != '-' &&
            !(digits == 1 && doc.text[node->start] == '0') && digits < sizeof error->code) {
            memcpy(error->code, doc.text + node->start, digits);
            error->code[digits] = '\0';
        }
    }
    json_free(&doc);
    buf_free(&msg);
    buf_free(&details);
    buf_free(&why);
    return result;
}
