/*
 * Test doubles of QEMU's variadic error reporting, for the glue's Rust tests only (feature
 * glue-tests; never linked into QEMU): Rust cannot define a variadic function, so these
 * format the message and hand it to qcow2b_test_message (src/glue/qemu_stubs.rs), which
 * records it for the tests to read.
 */
#include <stdarg.h>
#include <stdio.h>

typedef struct Error Error;

/* Records `text` (kind 0 error_report, 1 error_printf, 2 error_setg, 3 error_append_hint);
 * returns the token an Error * is set to. */
void *qcow2b_test_message(int kind, const char *text);

static void *record(int kind, const char *fmt, va_list ap)
{
    char text[4096];
    vsnprintf(text, sizeof(text), fmt, ap);
    return qcow2b_test_message(kind, text);
}

void error_report(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    record(0, fmt, ap);
    va_end(ap);
}

int error_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    record(1, fmt, ap);
    va_end(ap);
    return 0;
}

void error_setg_internal(Error **errp, const char *src, int line, const char *func,
                         const char *fmt, ...)
{
    va_list ap;
    void *token;
    (void)src;
    (void)line;
    (void)func;
    va_start(ap, fmt);
    token = record(2, fmt, ap);
    va_end(ap);
    if (errp && !*errp) {
        *errp = (Error *)token;
    }
}

/* A hint after an error (the legacy AES refusal in system emulators): recorded as kind 3. */
void error_append_hint(Error *const *errp, const char *fmt, ...)
{
    va_list ap;
    (void)errp;
    va_start(ap, fmt);
    record(3, fmt, ap);
    va_end(ap);
}
