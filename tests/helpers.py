"""Small helpers the test modules share."""


def exit_code(main, argv):
    """The exit code of main(argv), as the shell would see it: 0 when it returns, else what it passed to sys.exit."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0
