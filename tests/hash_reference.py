"""Plain-loop pieces of the Engram hash definition shared by the tests (no code from engram_model)."""


def ref_is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True
