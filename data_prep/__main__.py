# Guarded: spawned pool workers import this module as __mp_main__ and must not load the CLI's imports.
if __name__ == "__main__":
    from data_prep.cli import main

    main()
