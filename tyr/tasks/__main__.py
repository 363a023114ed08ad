from tyr.tasks import main

main()
