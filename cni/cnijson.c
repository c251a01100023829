/* pinion-cni's JSON (see cnicore.h): buffers, WTF-8, a strict bounded reader, and values printed
 * as Python's json.dumps() and repr() print them. */
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

int hex_value(unsigned char c) {
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
